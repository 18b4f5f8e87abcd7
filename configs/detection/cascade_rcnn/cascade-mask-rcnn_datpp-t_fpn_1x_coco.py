# Cascade Mask R-CNN, DAT-T++ backbone, 1x schedule (12 epochs), COCO.
# DAT++ recipe (LeapLabTHU/DAT-Detection configs/dat/cmrcn_tiny_1x_4n_dp00_lr4.py):
# 32 GPUs x 2 images = batch 64; AdamW lr 4e-4 (Swin's
# 1e-4 per 16 images scaled to 64); mixed precision; gradient checkpointing;
# no drop path at 1x. Swin-style box heads (4 conv + 1 fc with SyncBN, GIoU
# loss x10); plain FPN with 5 levels (mmdet base).
# SyncBN needs a distributed run; on one device see the override in
# ../_base_/models/cascade-mask-rcnn_fpn_4conv1fc-giou.py.
_base_ = [
    '../_base_/models/cascade-mask-rcnn_fpn_4conv1fc-giou.py',
    '../_base_/datasets/coco_instance_detr-ms.py',
    '../_base_/schedules/schedule_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)
runner_type = 'DATRunner'  # mmengine's Runner that checks the dataset paths first (projects/dat/runner.py)
# Crash-safe checkpoint writes (projects/dat/hooks.py); interval etc. stay those of the base.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch='datpp-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)

train_dataloader = dict(batch_size=2)  # x 32 GPUs = 64 images
optim_wrapper = dict(optimizer=dict(lr=4e-4))
auto_scale_lr = dict(enable=False, base_batch_size=64)
