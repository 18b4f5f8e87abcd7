# UperNet, DAT-T (v1) backbone, ADE20K, 512x512 crops, 160k iterations.
# The original repositories publish DAT++ ADE20K configs only
# (LeapLabTHU/DAT-Segmentation); DAT (v1) followed Swin's mmseg
# recipe, which is the base kept here: 8 GPUs x 2 images = batch 16; AdamW
# lr 6e-5, weight decay 0.01 (none on norms and bias tables); 1500 warm-up
# iterations from 1e-6 x lr, then poly decay with power 1; UPerHead 512
# channels, auxiliary FCN head on stage 2 with weight 0.4; drop path 0.3 for
# every size; full precision. Gradient checkpointing as in the DAT codebase's
# UperNet configs (memory only, same result).
# Test: whole image resized to 2048x512; `--tta` for the multi-scale test
# (ratios 0.5-1.75 with flip). SyncBN heads need a distributed run; on one
# device add
#   --cfg-options model.decode_head.norm_cfg.type=BN \
#                 model.auxiliary_head.norm_cfg.type=BN
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
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
        drop_path_rate=0.3,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dat-t_in1k_converted.pth', prefix='backbone.'),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'rpe_table': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'rpb': dict(decay_mult=0.0),
        },
    )
)

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images
