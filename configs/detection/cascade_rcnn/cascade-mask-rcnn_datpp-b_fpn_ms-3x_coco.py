# Cascade Mask R-CNN, DAT-B++ (128..1024 channels), 3x: the DAT-T++ 3x recipe
# with drop path 0.8, full precision, and one image per GPU: 64 GPUs x 1 =
# batch 64, so the lr stays 4e-4 (LeapLabTHU/DAT-Detection
# configs/dat/cmrcn_base_3x_8n_dp08_lr4.py: 8 nodes, 1 image per GPU).
_base_ = './cascade-mask-rcnn_datpp-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-b', drop_path_rate=0.8, init_cfg=dict(checkpoint='checkpoints/datpp-b_in1k_converted.pth')
    ),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)

train_dataloader = dict(batch_size=1)  # x 64 GPUs = 64 images
optim_wrapper = dict(type='OptimWrapper')  # fp32
