# DINO 4-scale, DAT-T++ backbone, 12 epochs, COCO. Not in the DAT++ papers and never released
# by LeapLabTHU/DAT: no published number exists for it.
# The detector, data and schedule are mmdet's dino-4scale_r50_8xb2-12e_coco.py, unchanged:
# 900 queries, 6 + 6 encoder / decoder layers, denoising queries, DETR-style multi-scale
# training (short side 480..800, or a 384..600 crop first), 8 GPUs x 2 images = batch 16,
# AdamW lr 1e-4, weight decay 1e-4, backbone at 0.1 x lr, gradient clipping at norm 0.1,
# fp32, lr divided by 10 after epoch 11.
# What the DAT-T++ backbone changes:
# - backbone outputs 1-3 (strides 8, 16, 32; 128, 256, 512 channels) into ChannelMapper in
#   place of ResNet-50's C3-C5; the 4th level is ChannelMapper's stride-2 conv on the last
#   input, as in mmdet's base;
# - drop path 0.0 and gradient checkpointing, as our DAT-T++ 1x detectors (the released
#   LeapLabTHU/DAT-Detection 1x configs);
# - no weight decay on the backbone's norms and bias tables, as in our other DAT++ configs
#   (../../_base_/datpp_query_heads.py keeps mmdet's 0.1 x lr on them).
_base_ = [
    'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    '../../_base_/datpp_query_heads.py',
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
    neck=dict(in_channels=[128, 256, 512]),
)

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.datpp_backbone_keys}}))
auto_scale_lr = dict(enable=False, base_batch_size=16)  # 8 GPUs x 2 images, as the base
