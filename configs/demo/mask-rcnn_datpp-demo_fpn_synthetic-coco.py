# DAT++ Mask R-CNN for the CPU demo (tools/demo.py): the real DAT-T++ Mask R-CNN config on
# the synthetic shapes dataset (projects/dat/synthetic.py: 3 classes, 160x160 images),
# trained from scratch in a few minutes on 2 CPU cores.
# What differs from the real config, and why (CPU, minutes, tiny images):
# - a reduced DAT++: 32-64-128-256 channels, one N and one D block per stage (DD in the
#   last), i.e. the block pattern of DAT-T++ at a fraction of its depth and width;
#   random init (no ImageNet weights), no drop path, no gradient checkpointing;
# - FPN and heads at 128 channels (box head fc 512) instead of 256 (1024), fewer RPN
#   proposals and RoI samples (a few objects per image): an iteration costs ~3x less;
# - 160x160 single-scale input with flip, batch 4, 600 iterations, fp32 AdamW.
_base_ = '../detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py'

classes = ('circle', 'rectangle', 'triangle')  # projects.dat.synthetic.COCO_CLASSES
data_root = 'outputs/demo/data/'
img_scale = (160, 160)
max_iters = 600
dims = [32, 64, 128, 256]
width = 128  # FPN and head channels

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
        with_cp=False,
        img_size=img_scale[0],
        init_cfg=None,
    ),
    neck=dict(in_channels=dims, out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=4 * width, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, num_classes=len(classes)),
    ),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)),
)

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
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=16),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# fp32 on CPU; the base's AdamW, weight decay and no-decay keys are kept.
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=4e-4), clip_grad=dict(max_norm=10.0))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[int(max_iters * 0.8)],
        gamma=0.1,
    ),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
)
log_processor = dict(by_epoch=False, window_size=20)
auto_scale_lr = dict(enable=False, base_batch_size=4)
randomness = dict(seed=0)
