# DAT-T (v1) on ImageNet-1k at 224x224, the original trainer's recipe
# (LeapLabTHU/DAT at tag CVPR2022: config.py defaults and configs/dat_tiny.yaml):
# - 300 epochs; 8 GPUs x 128 images = batch 1024.
# - AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 except on 1-D
#   parameters, biases and the bias tables; gradient clipping at norm 5.0.
# - lr = 5e-4 x 1024 / 512 = 1e-3. Linear warm-up over 20 epochs from the
#   warm-up lr 5e-7 x 1024 / 512 = 1e-6 (start factor 1e-6 / 1e-3 = 1e-3), then
#   cosine decay to the minimum lr 5e-6 x 1024 / 512 = 1e-5 (ratio 0.01 of the
#   lr, so `--auto-scale-lr` rescales all three together). Iteration-wise
#   updates. One difference: mmengine starts the cosine after the warm-up,
#   while the original timm scheduler evaluated its cosine over all 300 epochs
#   and overwrote the first 20 with the warm-up (lr at most ~5% of peak higher
#   here mid-run).
# - Augmentation (mmpretrain's Swin pipeline matches the original timm one):
#   RandomResizedCrop 224 (bicubic), flip, RandAugment rand-m9-mstd0.5-inc1,
#   random erasing 0.25 with per-pixel random fill; Mixup 0.8 / CutMix 1.0,
#   one of the two per batch with equal probability (timm's switch prob 0.5),
#   label smoothing 0.1. The original config sets colour jitter 0.4, but timm
#   disables colour jitter whenever RandAugment is on, so there is none here.
# - Test: resize the short side to 224 / 0.875 = 256 (bicubic), centre crop.
# - Mixed precision: the original launcher passes --amp (fp16 autocast).
# The same config evaluates a converted original checkpoint
# (tools/model_converters/dat_official.py).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)
runner_type = 'DATRunner'  # mmengine's Runner that checks the dataset paths first (projects/dat/runner.py)
# Crash-safe checkpoint writes (projects/dat/hooks.py); interval etc. stay those of the base.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))

model = dict(
    type='ImageClassifier',
    backbone=dict(type='DAT', arch='dat-t', out_indices=(3,), drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        # The original classifier kept PyTorch's default Linear init.
        init_cfg=None,
        cal_acc=False,
    ),
    train_cfg=dict(
        augments=[
            dict(type='Mixup', alpha=0.8),
            dict(type='CutMix', alpha=1.0),
        ]
    ),
)

train_dataloader = dict(batch_size=128)  # x 8 GPUs = 1024 images

optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4 * 1024 / 512, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'rpe_table': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'rpb': dict(decay_mult=0.0),
        },
    ),
    clip_grad=dict(max_norm=5.0),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=5e-7 / 5e-4, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min_ratio=5e-6 / 5e-4,
        by_epoch=True,
        begin=20,
        end=300,
        convert_to_iter_based=True,
    ),
]
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
auto_scale_lr = dict(enable=False, base_batch_size=1024)
