"""Write a small synthetic dataset in the COCO, ADE20K or ImageNet format.

Examples::

    python tools/data/make_synthetic.py coco data/synthetic_coco --num-train 64 --num-val 16
    python tools/data/make_synthetic.py ade20k data/synthetic_ade --size 128 128
    python tools/data/make_synthetic.py imagenet data/synthetic_imagenet --num-train 16

See ``projects/dat/synthetic.py`` for the layouts and the content of the images.
"""

import argparse

from projects.dat.synthetic import make_dataset

DEFAULTS = dict(coco=(64, 16, (160, 160)), ade20k=(32, 8, (128, 128)), imagenet=(16, 4, (64, 64)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('kind', choices=sorted(DEFAULTS), help='dataset format')
    parser.add_argument('out_dir', help='dataset root to write')
    parser.add_argument(
        '--num-train',
        type=int,
        default=None,
        help='training images (per class for imagenet); defaults: coco 64, ade20k 32, imagenet 16',
    )
    parser.add_argument(
        '--num-val',
        type=int,
        default=None,
        help='validation images (per class for imagenet); defaults: coco 16, ade20k 8, imagenet 4',
    )
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        default=None,
        help='image size; defaults: coco 160 160, ade20k 128 128, imagenet 64 64',
    )
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    parser.add_argument(
        '--noise', type=float, default=12.0, help='std of the background pixel noise in grey levels (default 12)'
    )
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    num_train, num_val, size = DEFAULTS[args.kind]
    written = make_dataset(
        args.kind,
        args.out_dir,
        num_train=num_train if args.num_train is None else args.num_train,
        num_val=num_val if args.num_val is None else args.num_val,
        size=size if args.size is None else tuple(args.size),
        seed=args.seed,
        noise=args.noise,
        progress=not args.no_progress,
    )
    print(f'\nwrote {args.kind} dataset to {args.out_dir}:')
    for split, path in written.items():
        print(f'  {split}: {path}')


if __name__ == '__main__':
    main()
