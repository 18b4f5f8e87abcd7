# Tiny DAT++ UperNet on the synthetic ADE20K-style dataset (projects/dat/synthetic.py,
# 5 classes = the first 5 ADE20K ids, 64x64 images): a CPU smoke-test of the real UperNet
# config (tests/test_tools.py). Differences: a reduced DAT++ (32-64-128-256) with random
# init, no drop path, no gradient checkpointing; 64x64 crops; narrow heads (64/32 channels);
# fp32; a 20-iteration schedule. The heads' SyncBN stays: tools/train.py turns it into BN
# when there is no CUDA.
_base_ = '../segmentation/upernet/upernet_datpp-t_8xb2-160k_ade20k-512x512.py'

classes = ('wall', 'building', 'sky', 'floor', 'tree')  # ADE20K ids 1..5
data_root = 'outputs/demo/ade20k/'
crop_size = (64, 64)
max_iters = 20
dims = [32, 64, 128, 256]

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(
            _delete_=True,
            version='pp',
            dims=dims,
            heads=[1, 2, 4, 8],
            groups=[1, 1, 2, 4],
            stage_spec=['ND', 'ND', 'ND', 'DD'],
        ),
        drop_path_rate=0.0,
        with_cp=False,
        img_size=crop_size[0],
        init_cfg=None,
    ),
    decode_head=dict(in_channels=dims, channels=64, num_classes=len(classes)),
    auxiliary_head=dict(in_channels=dims[2], channels=32, num_classes=len(classes)),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
img_ratios = [0.75, 1.0, 1.25]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
            [
                dict(type='RandomFlip', prob=0.0, direction='horizontal'),
                dict(type='RandomFlip', prob=1.0, direction='horizontal'),
            ],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ],
    ),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline),
)
test_dataloader = val_dataloader

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=2e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=5),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=5, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
)
randomness = dict(seed=0)
