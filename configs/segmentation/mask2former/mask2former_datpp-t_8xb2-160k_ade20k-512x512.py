# Mask2Former, DAT-T++ backbone, ADE20K semantic segmentation, 512x512 crops, 160k iterations.
# Not in the DAT++ papers and never released by LeapLabTHU/DAT: no published number exists.
# The segmentor, data and schedule are mmseg's mask2former_r50_8xb2-160k_ade20k-512x512.py,
# unchanged, as mmseg's mask2former_swin-t_8xb2-160k_ade20k-512x512.py keeps them: 100
# queries, MSDeformAttn pixel decoder (6 layers) on strides 8-32, 9 decoder layers, 150
# classes; random short side 256..1024 (capped at 2048), 512x512 crops, flip, photometric
# distortion; 8 GPUs x 2 images = batch 16, AdamW lr 1e-4, weight decay 0.05, backbone at
# 0.1 x lr, no weight decay on norms and the query / level embeddings, gradient clipping at
# norm 0.01, fp32, poly decay (power 0.9) to 0 over 160k iterations. Test: whole image at
# 2048x512 (the base's ADE20K pipeline).
# What the DAT-T++ backbone changes:
# - its four outputs (strides 4-32; 64, 128, 256, 512 channels) into the head;
# - drop path 0.3 and gradient checkpointing, as our DAT-T++ UperNet 160k (the released
#   LeapLabTHU/DAT-Segmentation config upn_tiny_160k_dp03_lr6.py);
# - no weight decay on the backbone's norms and bias tables (../../_base_/datpp_query_heads.py);
# - `mmdet.models` stays imported, as in the base: the head is built from mmdet's parts.
_base_ = [
    'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py',
    '../../_base_/datpp_query_heads.py',
]
custom_imports = dict(imports=['projects.dat', 'mmdet.models'], allow_failed_imports=False)
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
)

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.datpp_backbone_keys}}))
