# UperNet, DAT-T++ backbone, ADE20K, 512x512 crops, 160k iterations.
# DAT++ recipe (LeapLabTHU/DAT-Segmentation configs/dat/upn_tiny_160k_dp03_lr6.py),
# which is Swin's mmseg recipe kept from the base:
# 8 GPUs x 2 images = batch 16; AdamW lr 6e-5, weight decay 0.01 (none on
# norms and bias tables); linear warm-up over 1500 iterations from 1e-6 x lr,
# then poly decay with power 1 to 0; UPerHead with 512 channels, auxiliary
# FCN head on stage 2 (256 channels for T++) with loss weight 0.4.
# Differences from the base: the DAT-T++ backbone with drop path 0.3,
# gradient checkpointing and mixed precision (both as in the released DAT++
# UperNet T/S configs).
# Test: whole image resized to 2048x512; `tools/test.py CONFIG CKPT --tta`
# runs the multi-scale test (ratios 0.5-1.75 with flip, the base's
# tta_pipeline). SyncBN heads need a distributed run; on one device add
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
        arch='datpp-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256),
)

optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'rpe_table': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'rpb': dict(decay_mult=0.0),
        },
    ),
)

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images
