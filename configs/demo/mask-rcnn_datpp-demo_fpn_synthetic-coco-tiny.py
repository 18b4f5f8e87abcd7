# The demo Mask R-CNN shrunk for the tests (tests/test_tools.py): 64x64 images, batch 2,
# 2 iterations. Only for checking that the tools run end to end, not for accuracy.
_base_ = './mask-rcnn_datpp-demo_fpn_synthetic-coco.py'

img_scale = (64, 64)
max_iters = 2

model = dict(backbone=dict(img_size=img_scale[0]))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=max_iters),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=max_iters))
log_processor = dict(window_size=1)
