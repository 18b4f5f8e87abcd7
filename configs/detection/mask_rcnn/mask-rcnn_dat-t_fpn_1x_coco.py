# Mask R-CNN, DAT-T (v1) backbone, 1x schedule (12 epochs), COCO.
# The original repositories publish DAT++ COCO configs only
# (LeapLabTHU/DAT-Detection); DAT (v1) followed Swin's mmdet recipe,
# used here: 8 GPUs x 2 images = batch 16, AdamW lr 1e-4 with weight decay
# 0.05, 500 warm-up iterations, mixed precision, DETR-style multi-scale
# training also at 1x, drop path 0.2, and mmdet's plain FPN (extra level by
# max-pooling). Gradient checkpointing is on as in the DAT++ runs: it saves
# memory and does not change the result.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
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
        arch='dat-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images
optim_wrapper = dict(optimizer=dict(lr=1e-4))
auto_scale_lr = dict(enable=False, base_batch_size=16)
