# RetinaNet, DAT-T (v1) backbone, 1x schedule (12 epochs), COCO.
# The original repositories publish DAT++ COCO configs only
# (LeapLabTHU/DAT-Detection); DAT (v1) followed Swin's mmdet recipe
# for all its detectors, used here: 8 GPUs x 2 images = batch 16, AdamW lr
# 1e-4 with weight decay 0.05 (mmdet's own Swin RetinaNet port uses SGD; the
# Swin/DAT recipe is AdamW), 500 warm-up iterations, mixed precision,
# DETR-style multi-scale training also at 1x, drop path 0.2 (as in mmdet's
# Swin-T RetinaNet). Gradient checkpointing is on as in the DAT++ runs: it
# saves memory and does not change the result.
# Backbone outputs 1-3 (strides 8/16/32, 192/384/768 channels) feed the FPN;
# P6/P7 are stride-2 convs on the last backbone map.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/datasets/coco_detection_detr-ms.py',
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
        out_indices=(1, 2, 3),
        drop_path_rate=0.2,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[192, 384, 768], start_level=0, add_extra_convs='on_input', num_outs=5),
)

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images
optim_wrapper = dict(optimizer=dict(lr=1e-4))
auto_scale_lr = dict(enable=False, base_batch_size=16)
