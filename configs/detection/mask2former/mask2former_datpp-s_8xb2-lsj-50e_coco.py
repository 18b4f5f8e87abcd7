# Mask2Former, DAT-S++ (96..768 channels), COCO instance segmentation, LSJ, 50 epochs: the
# DAT-T++ config with drop path 0.5, as our DAT-S++ Mask R-CNN 3x (the released
# LeapLabTHU/DAT-Detection config). No published number exists for it.
_base_ = './mask2former_datpp-t_8xb2-lsj-50e_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.5, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    panoptic_head=dict(in_channels=[96, 192, 384, 768]),
)
