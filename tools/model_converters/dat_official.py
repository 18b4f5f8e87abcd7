#!/usr/bin/env python
"""Convert a released DAT / DAT++ checkpoint to this toolkit's format.

ImageNet checkpoints (weights under ``'model'``) become checkpoints of our mmpretrain
classifier configs (``configs/classification``); original mmdet 2.x / mmseg 0.x DAT++
checkpoints (``'state_dict'`` with ``backbone.*``) become checkpoints of our mmdet 3 /
mmseg 1 configs. The conversion is strict: every source tensor is used exactly once and
every target tensor is filled, or it stops and lists what is wrong.

Example::

    python tools/model_converters/dat_official.py dat_pp_tiny_in1k_224.pth \
        checkpoints/datpp-t_in1k_converted.pth --trust-checkpoint
"""

import argparse
import os
import sys

from projects.dat.checkpoint import CheckpointError, atomic_save, extract_state_dict, load_original_checkpoint
from projects.dat.converter import ConversionError, convert_original_state_dict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='original checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='allow full unpickling of SRC (runs code from the file: only for files '
        'from a trusted source such as the official release)',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(f'[1/3] loading {args.src}')
        state_dict = extract_state_dict(load_original_checkpoint(args.src, trusted=args.trust_checkpoint))
        print(f'[2/3] converting {len(state_dict)} tensors')
        converted, info = convert_original_state_dict(state_dict)
    except (CheckpointError, ConversionError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    arch = info['arch'] if isinstance(info['arch'], str) else f'custom {info["arch"]}'
    print(
        f'      detected DAT {"v1" if info["version"] == "v1" else "++"} ({info["version"]}), arch {arch}, '
        f'construction size {info["img_size"][0]}x{info["img_size"][1]}, {info["kind"]} checkpoint'
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    atomic_save(dict(state_dict=converted, meta=dict(dat=info, source=os.path.basename(args.src))), args.dst)
    print(f'[3/3] wrote {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
