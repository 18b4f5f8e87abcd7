# DINO 5-scale, DAT-T++ backbone, 12 epochs, COCO: the 4-scale DAT-T++ config changed as
# mmdet's dino-5scale_swin-l_8xb2-12e_coco.py changes the R-50 4-scale one for a transformer
# backbone. No published number exists for it.
# - all four backbone outputs (strides 4-32; 64, 128, 256, 512 channels) into ChannelMapper,
#   whose stride-2 conv on the last input adds the 5th level (stride 64);
# - 5 feature levels in the detector, the encoder's self-attention and the decoder's
#   cross-attention;
# - backbone lr multiplier 0.1 and gradient clipping at norm 0.1: the Swin-L config keeps
#   those of the R-50 base, and so does this one;
# - drop path 0.0 (our DAT-T++ 1x detectors; the Swin-L config's 0.2 is Swin-L's) and
#   gradient checkpointing (the Swin-L config has it on too).
_base_ = './dino-4scale_datpp-t_8xb2-12e_coco.py'

num_levels = 5
model = dict(
    num_feature_levels=num_levels,
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[64, 128, 256, 512], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))),
)
