# Mask2Former, DAT-B++ backbone, ADE20K semantic segmentation, 640x640 crops, 160k iterations.
# Not in the DAT++ papers and never released by LeapLabTHU/DAT: no published number exists.
# The segmentor, data and schedule are mmseg's
# mask2former_swin-b-in1k-384x384-pre_8xb2-160k_ade20k-640x640.py, unchanged: the head and
# optimiser of the 512x512 configs (see mask2former_datpp-t_8xb2-160k_ade20k-512x512.py) with
# random short side 320..1280 (capped at 2560), 640x640 crops, test at 2560x640.
# What the DAT-B++ backbone changes:
# - its four outputs (strides 4-32; 128, 256, 512, 1024 channels) into the head;
# - ImageNet-1k weights from 224x224 training (DAT-B++ has no 384 ImageNet-1k model besides the
#   fine-tuned classifier; our other DAT-B++ dense configs start from the 224 one too);
# - drop path 0.7 and gradient checkpointing, as our DAT-B++ UperNet 160k (the released
#   LeapLabTHU/DAT-Segmentation config upn_base_160k_dp07_lr6.py);
# - the optimiser's parameter-wise rules: the Swin keys of the base are replaced by the DAT++
#   backbone's (../../_base_/datpp_query_heads.py) next to the same query / level embedding
#   keys as the base's (lr x 1, no weight decay);
# - `mmdet.models` imported, as the 512x512 configs do after mmseg's R-50 base.
_base_ = [
    'mmseg::mask2former/mask2former_swin-b-in1k-384x384-pre_8xb2-160k_ade20k-640x640.py',
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
        arch='datpp-b',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.7,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-b_in1k_converted.pth', prefix='backbone.'),
    ),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
)

# The base's Swin keys go; norm_decay_mult 0 (no decay on the heads' norms) is the base's.
optim_wrapper = dict(
    paramwise_cfg=dict(_delete_=True, custom_keys={{_base_.datpp_mask2former_keys}}, norm_decay_mult=0.0)
)
