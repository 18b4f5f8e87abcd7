# RetinaNet, DAT-T++ backbone, 1x schedule (12 epochs), COCO.
# DAT++ recipe (LeapLabTHU/DAT-Detection configs/dat/rtn_tiny_1x_4n_dp00_lr2.py):
# 32 GPUs x 2 images = batch 64; AdamW lr 2e-4 (half
# the two-stage detectors' 4e-4); mixed precision; gradient checkpointing; no
# drop path at 1x. Focal loss, L1 box loss (mmdet base).
# Backbone outputs 1-3 (strides 8/16/32) feed the FPN; P6/P7 are stride-2
# convs on the last backbone map ("on input"). The original configs wrote
# this as four FPN inputs with start_level=1; the backbone here returns only
# the three used maps (no unused parameters under DDP), so start_level=0.
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
        arch='datpp-t',
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[128, 256, 512], start_level=0, add_extra_convs='on_input', num_outs=5),
)

train_dataloader = dict(batch_size=2)  # x 32 GPUs = 64 images
optim_wrapper = dict(optimizer=dict(lr=2e-4))
auto_scale_lr = dict(enable=False, base_batch_size=64)
