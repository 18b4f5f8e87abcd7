# RetinaNet, DAT-S++ (96..768 channels), 3x: the DAT-T++ 3x recipe with drop
# path 0.5 (LeapLabTHU/DAT-Detection configs/dat/rtn_small_3x_4n_dp05_lr2.py).
# FPN inputs are backbone outputs 1-3: 192, 384, 768.
_base_ = './retinanet_datpp-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.5, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[192, 384, 768]),
)
