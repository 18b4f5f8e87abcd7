# Semantic FPN, DAT-T++ backbone, ADE20K, 512x512 crops.
# The papers' "80k" Semantic FPN schedule (PVT's: batch 16, lr 1e-4, 80k
# iterations) run on 8 GPUs x 4 images = batch 32: the lr doubles to 2e-4 and
# the iterations halve to 40k (LeapLabTHU/DAT-Segmentation
# configs/dat/fpn_tiny_80k_dp04_lr2.py). AdamW, weight decay 1e-4 (none on
# norms and bias tables), poly decay with power 0.9 to 0, no warm-up; drop
# path 0.4; full precision, no gradient checkpointing (as the released
# configs). FPN 256 channels, FPN head 128 channels (mmseg base).
# Test: whole image resized to 2048x512; `--tta` for the multi-scale test
# (ratios 0.5-1.75 with flip). The FPN head uses SyncBN; on one device add
#   --cfg-options model.decode_head.norm_cfg.type=BN
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_40k.py',
]
custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)
runner_type = 'DATRunner'  # mmengine's Runner that checks the dataset paths first (projects/dat/runner.py)
# Crash-safe checkpoint writes (projects/dat/hooks.py); interval etc. stay those of the base.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))

crop_size = (512, 512)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch='datpp-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150),
)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'rpe_table': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'rpb': dict(decay_mult=0.0),
        }
    ),
)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]

train_dataloader = dict(batch_size=4)  # x 8 GPUs = 32 images
