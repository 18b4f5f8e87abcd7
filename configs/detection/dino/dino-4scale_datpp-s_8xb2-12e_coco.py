# DINO 4-scale, DAT-S++ (96..768 channels), 12 epochs: the DAT-T++ config with outputs 1-3
# of 192, 384, 768 channels and drop path 0.1, as our DAT-S++ 1x detectors (the released
# LeapLabTHU/DAT-Detection 1x configs). No published number exists for it.
_base_ = './dino-4scale_datpp-t_8xb2-12e_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.1, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[192, 384, 768]),
)
