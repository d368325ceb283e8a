//! diffusers' `AutoencoderKL`, built from `vae/config.json`, frozen and forward only:
//! - the encoder ([`VaeEncoder`]): images in [-1, 1] to the latent posterior mean, shifted by
//!   `shift_factor` and times `scaling_factor` (what training caches);
//! - the decoder ([`VaeDecoder`]): such latents back to images in [-1, 1] (what previews
//!   render). It is loaded only by whoever renders images, not for training.

use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

use super::unet::ResnetBlock2D;
use crate::model::ModelError;
use crate::model::layers::ops::{self, Conv2d, GroupNorm, Linear};
use crate::model::weights::Weights;

/// The keys of diffusers' `AutoencoderKL` config the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The VAE's single-head spatial self-attention.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn load(vb: &Weights, c: usize, groups: usize) -> std::result::Result<Self, ModelError> {
        // Pre-0.14 diffusers checkpoints name the projections query/key/value/proj_attn.
        let legacy = !vb.contains("to_q.weight") && vb.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, c, 1e-6)?,
            to_q: Linear::load(&vb.pp(name("to_q", "query")), c, c, true)?,
            to_k: Linear::load(&vb.pp(name("to_k", "key")), c, c, true)?,
            to_v: Linear::load(&vb.pp(name("to_v", "value")), c, c, true)?,
            to_out: Linear::load(&vb.pp(name("to_out.0", "proj_attn")), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let a = self.to_out.forward(&ops::attention(&q, &k, &v, 1)?)?;
        let a = a.transpose(1, 2)?.reshape((b, c, h, w))?;
        a + x
    }
}

/// `count` resnets of a VAE block: the first from `in_c` channels, all to `out_c`.
fn resnet_stack(
    vb: &Weights,
    count: usize,
    in_c: usize,
    out_c: usize,
    groups: usize,
) -> std::result::Result<Vec<ResnetBlock2D>, ModelError> {
    (0..count)
        .map(|j| {
            let rin = if j == 0 { in_c } else { out_c };
            ResnetBlock2D::load(&vb.pp("resnets").pp(j), rin, out_c, None, groups, 1e-6)
        })
        .collect()
}

#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

/// `AutoencoderKL.encoder` + `quant_conv`.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv2d,
    blocks: Vec<DownEncoderBlock>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    pub(crate) fn load(vb: &Weights, cfg: &VaeConfig) -> std::result::Result<Self, ModelError> {
        let boc = &cfg.block_out_channels;
        if boc.is_empty() {
            return Err(ModelError::UnsupportedConfig {
                path: "vae/config.json".into(),
                reason: "block_out_channels is empty".into(),
            });
        }
        if let Some(t) = cfg
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return Err(ModelError::UnsupportedConfig {
                path: "vae/config.json".into(),
                reason: format!("down block type {t:?} is not supported"),
            });
        }
        let g = cfg.norm_num_groups;
        let enc = vb.pp("encoder");
        let mut blocks = Vec::new();
        let mut in_c = boc[0];
        for (i, &out_c) in boc.iter().enumerate() {
            let bvb = enc.pp("down_blocks").pp(i);
            let resnets = resnet_stack(&bvb, cfg.layers_per_block, in_c, out_c, g)?;
            let downsample = if i + 1 < boc.len() {
                Some(Conv2d::load(
                    &bvb.pp("downsamplers").pp(0).pp("conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            blocks.push(DownEncoderBlock {
                resnets,
                downsample,
            });
            in_c = out_c;
        }
        let last = boc[boc.len() - 1];
        let two_l = 2 * cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            conv_in: Conv2d::load(&enc.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(&enc.pp("mid_block"), last, cfg)?,
            conv_norm_out: GroupNorm::load(&enc.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: Conv2d::load(&enc.pp("conv_out"), last, two_l, 3, 1, 1)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::load(&vb.pp("quant_conv"), two_l, two_l, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// Pixel-to-latent downscale factor.
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// (B, 3, H, W) in [-1, 1] -> (B, latent_channels, H/f, W/f), scaled (and shifted).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &block.downsample {
                // diffusers pads (0, 1, 0, 1) before the stride-2 conv in the encoder.
                h = d.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = self.mid.forward(&h)?;
        h = self
            .conv_out
            .forward(&ops::silu(&self.conv_norm_out.forward(&h)?)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let mean = h.narrow(1, 0, self.config.latent_channels)?;
        let shifted = match self.config.shift_factor {
            Some(s) => (mean - s)?,
            None => mean,
        };
        shifted * self.config.scaling_factor
    }
}

#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

/// The middle of the encoder and of the decoder: resnet, optional single-head attention,
/// resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn load(vb: &Weights, c: usize, cfg: &VaeConfig) -> std::result::Result<Self, ModelError> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            resnet0: ResnetBlock2D::load(&vb.pp("resnets").pp(0), c, c, None, g, 1e-6)?,
            attention: if cfg.mid_block_add_attention {
                Some(VaeAttention::load(&vb.pp("attentions").pp(0), c, g)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(&vb.pp("resnets").pp(1), c, c, None, g, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

/// `post_quant_conv` + `AutoencoderKL.decoder`.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    pub(crate) fn load(vb: &Weights, cfg: &VaeConfig) -> std::result::Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::UnsupportedConfig {
            path: "vae/config.json".into(),
            reason,
        };
        let boc = &cfg.block_out_channels;
        let (Some(&first), Some(&last)) = (boc.first(), boc.last()) else {
            return Err(unsupported("block_out_channels is empty".into()));
        };
        if let Some(t) = cfg
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(unsupported(format!("up block type {t:?} is not supported")));
        }
        let g = cfg.norm_num_groups;
        let dec = vb.pp("decoder");
        let mut blocks = Vec::new();
        let mut in_c = last;
        // diffusers' up blocks run from the deepest channel count back to the first; each
        // has one resnet more than an encoder block, and all but the last upsample.
        for (i, &out_c) in boc.iter().rev().enumerate() {
            let bvb = dec.pp("up_blocks").pp(i);
            let resnets = resnet_stack(&bvb, cfg.layers_per_block + 1, in_c, out_c, g)?;
            let upsample = if i + 1 < boc.len() {
                Some(Conv2d::load(
                    &bvb.pp("upsamplers").pp(0).pp("conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            blocks.push(UpDecoderBlock { resnets, upsample });
            in_c = out_c;
        }
        let l = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
            conv_in: Conv2d::load(&dec.pp("conv_in"), l, last, 3, 1, 1)?,
            mid: MidBlock::load(&dec.pp("mid_block"), last, cfg)?,
            blocks,
            conv_norm_out: GroupNorm::load(&dec.pp("conv_norm_out"), g, first, 1e-6)?,
            conv_out: Conv2d::load(&dec.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// (B, latent_channels, h, w) latents as the encoder gives them (scaled, shifted) ->
    /// (B, out_channels, h·f, w·f) images, nominally in [-1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = (z / self.config.scaling_factor)?;
        let z = match self.config.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        let mut h = self.mid.forward(&self.conv_in.forward(&z)?)?;
        for block in &self.blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(up) = &block.upsample {
                h = up.forward(&ops::upsample_nearest_2x(&h)?)?;
            }
        }
        self.conv_out
            .forward(&ops::silu(&self.conv_norm_out.forward(&h)?)?)
    }
}
