"""Write a small synthetic dataset in the COCO, ADE20K or ImageNet format.

Examples::

    python tools/data/make_synthetic.py coco data/synthetic_coco --num-train 64 --num-val 16
    python tools/data/make_synthetic.py ade20k data/synthetic_ade --size 128 128
    python tools/data/make_synthetic.py imagenet data/synthetic_imagenet --num-train 16

See ``projects/dat/synthetic.py`` for the layouts and the content of the images.
"""

import argparse

from projects.dat.synthetic import FORMATS, make_dataset


def _defaults(describe) -> str:
    return 'defaults: ' + ', '.join(f'{kind} {describe(fmt)}' for kind, fmt in FORMATS.items())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('kind', choices=sorted(FORMATS), help='dataset format')
    parser.add_argument('out_dir', help='dataset root to write')
    parser.add_argument(
        '--num-train',
        type=int,
        help='training images (per class for imagenet); ' + _defaults(lambda fmt: fmt.NUM_TRAIN),
    )
    parser.add_argument(
        '--num-val',
        type=int,
        help='validation images (per class for imagenet); ' + _defaults(lambda fmt: fmt.NUM_VAL),
    )
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='image size; ' + _defaults(lambda fmt: ' '.join(map(str, fmt.SIZE))),
    )
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    parser.add_argument(
        '--noise', type=float, default=12.0, help='std of the background pixel noise in grey levels (default 12)'
    )
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    written = make_dataset(
        args.kind,
        args.out_dir,
        progress=not args.no_progress,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        seed=args.seed,
        noise=args.noise,
    )
    print(f'\nwrote {args.kind} dataset to {args.out_dir}:')
    for split, path in written.items():
        print(f'  {split}: {path}')


if __name__ == '__main__':
    main()
