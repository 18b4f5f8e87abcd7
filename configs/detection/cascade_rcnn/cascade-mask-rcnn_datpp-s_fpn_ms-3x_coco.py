# Cascade Mask R-CNN, DAT-S++ (96..768 channels), 3x: the DAT-T++ 3x recipe
# with drop path 0.5, trained in full precision (the one DAT++ COCO recipe
# besides B++ Cascade without mixed precision: LeapLabTHU/DAT-Detection
# configs/dat/cmrcn_small_3x_4n_dp05_lr4.py).
_base_ = './cascade-mask-rcnn_datpp-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.5, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)

optim_wrapper = dict(type='OptimWrapper')  # fp32
