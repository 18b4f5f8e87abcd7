# Tiny DAT++ classifier on the synthetic ImageNet-style dataset (projects/dat/synthetic.py,
# 4 shape classes, 64x64 images): a CPU smoke-test of the real DAT-T++ ImageNet config
# (tests/test_tools.py). Differences: a reduced DAT++ (32-64-128-256), no drop path; 64x64
# images with flip only and plain cross-entropy (no RandAugment, random erasing, Mixup /
# CutMix or label smoothing, which would hide the loss decrease of a few iterations); fp32;
# a 30-iteration schedule.
_base_ = '../classification/datpp-t_8xb128_in1k.py'

classes = ('circle', 'diamond', 'rectangle', 'triangle')  # synthetic.IMAGENET_CLASSES
data_root = 'outputs/demo/imagenet/'
img_size = 64
max_iters = 30
dims = [32, 64, 128, 256]

data_preprocessor = dict(num_classes=len(classes))
model = dict(
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
        img_size=img_size,
    ),
    head=dict(
        num_classes=len(classes),
        in_channels=dims[-1],
        loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0),
    ),
    train_cfg=None,
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=5.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=5),
]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
)
log_processor = dict(by_epoch=False, window_size=5)
randomness = dict(seed=0)
