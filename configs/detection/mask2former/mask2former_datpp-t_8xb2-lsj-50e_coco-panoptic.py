# Mask2Former, DAT-T++ backbone, COCO panoptic segmentation, large-scale jitter, 50 epochs.
# Not in the DAT++ papers and never released by LeapLabTHU/DAT: no published number exists.
# The segmentor, data and schedule are mmdet's mask2former_r50_8xb2-lsj-50e_coco-panoptic.py,
# unchanged, as mmdet's mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py keeps them:
# 100 queries, MSDeformAttn pixel decoder (6 layers) on strides 8-32, 9 decoder layers,
# 80 thing + 53 stuff classes; 1024x1024 LSJ crops (scale 0.1-2.0), 8 GPUs x 2 images =
# batch 16, AdamW lr 1e-4, weight decay 0.05, backbone at 0.1 x lr, no weight decay on norms
# and the query / level embeddings, gradient clipping at norm 0.01, fp32; 368750 iterations
# (50 epochs of 118k images at batch 16), lr divided by 10 at 327778 and 355092.
# What the DAT-T++ backbone changes:
# - its four outputs (strides 4-32; 64, 128, 256, 512 channels) into the head;
# - drop path 0.3, as our DAT-T++ Mask R-CNN 3x (the released LeapLabTHU/DAT-Detection
#   config for DAT++'s longest COCO schedule; the Swin-T config also uses 0.3), and gradient
#   checkpointing as in our other DAT++ configs;
# - no weight decay on the backbone's norms and bias tables (../../_base_/datpp_query_heads.py).
# Panoptic loading (LoadPanopticAnnotations) and CocoPanopticMetric need panopticapi
# (pip install git+https://github.com/cocodataset/panopticapi.git; see ../README.md).
_base_ = [
    'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py',
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
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    panoptic_head=dict(in_channels=[64, 128, 256, 512]),
)

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.datpp_backbone_keys}}))
