# RetinaNet, DAT-S (v1, 96..768 channels), 3x with multi-scale training: the
# DAT-T 3x recipe; drop path 0.2 as in Swin-S's detection configs.
_base_ = './retinanet_dat-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(arch='dat-s', drop_path_rate=0.2, init_cfg=dict(checkpoint='checkpoints/dat-s_in1k_converted.pth'))
)
