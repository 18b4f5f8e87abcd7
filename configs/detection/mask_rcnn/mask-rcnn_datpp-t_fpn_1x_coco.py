# Mask R-CNN, DAT-T++ backbone, 1x schedule (12 epochs), COCO.
# DAT++ recipe (LeapLabTHU/DAT-Detection configs/dat/mrcn_tiny_1x_4n_dp00_lr4.py):
# 32 GPUs x 2 images = batch 64; AdamW lr 4e-4, i.e.
# Swin's 1e-4 per 16 images scaled linearly to 64; mixed precision; gradient
# checkpointing; no drop path at 1x. FPN with 256 channels and 5 levels whose
# extra level is a stride-2 conv on the last backbone map ("on input");
# L1 box losses (mmdet base).
# `python tools/train.py CONFIG --auto-scale-lr` rescales the lr from the
# 64-image batch to the batch actually used.
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
        arch='datpp-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[64, 128, 256, 512], add_extra_convs='on_input'),
)

train_dataloader = dict(batch_size=2)  # x 32 GPUs = 64 images
optim_wrapper = dict(optimizer=dict(lr=4e-4))
auto_scale_lr = dict(enable=False, base_batch_size=64)
