# DINO 4-scale, DAT-S++, 24 epochs: the DAT-T++ 24-epoch config with the DAT-S++ backbone of
# dino-4scale_datpp-s_8xb2-12e_coco.py (drop path 0.1, kept from 12 epochs as for DAT-T++).
# No published number exists for it.
_base_ = './dino-4scale_datpp-t_8xb2-24e_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.1, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[192, 384, 768]),
)
