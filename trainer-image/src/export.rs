//! The deliverables: the trained adapters as a kohya-format LoRA (what ComfyUI and
//! Automatic1111 load) and as a diffusers/PEFT LoRA (what `load_lora_weights` loads), both
//! safetensors with `ss_*` (kohya) and `modelspec.*` (Stability's model spec) metadata.
//!
//! Module names: kohya files for SD1.5 use diffusers module paths with `_` for `.`; for SDXL
//! they use the SGM ("ldm") UNet naming, `input_blocks.N.1` / `middle_block.1` /
//! `output_blocks.N.1`, which [`diffusers_to_sgm`] derives from the block layout. For FLUX.1
//! they use Black Forest Labs' names (`double_blocks_N_img_attn_qkv`, `single_blocks_N_linear1`,
//! ...), where q, k and v (and, in single blocks, the MLP input) are one fused linear: sd-scripts
//! writes such a module as one adapter of rank parts × r whose `lora_up` is block-diagonal, which
//! is what ComfyUI applies as is and diffusers splits back ([`flux_kohya_module`]).
//! PEFT files cannot carry alpha per module, so alpha/rank is folded into `lora_B` there; their
//! keys start with the trained network (`unet.` or `transformer.`).

use std::collections::BTreeMap;

use loraplane_crds::v1alpha1::ModelFamily;

use crate::tensors::{HostTensor, TensorFile};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A module path has no kohya equivalent (SDXL: not in an attention block; FLUX.1: not a
    /// block layer Black Forest Labs' names cover).
    #[error("adapter {0} has no kohya module name")]
    MapModuleName(String),
    /// An adapter's tensors have inconsistent shapes.
    #[error("adapter {path}: {reason}")]
    CheckShapes {
        /// Module path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// One trained adapter on host memory.
#[derive(Clone, Debug)]
pub struct ExportAdapter {
    /// diffusers module path, e.g. `down_blocks.1.attentions.0.proj_in`.
    pub path: String,
    /// (rank, in).
    pub down: HostTensor,
    /// (out, rank).
    pub up: HostTensor,
    /// Adapter alpha.
    pub alpha: f64,
    /// The base layer is a 1x1 convolution (weights get trailing 1x1 dimensions).
    pub conv1x1: bool,
}

/// Facts about the run recorded in the files' metadata.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Base model family.
    pub family: ModelFamily,
    /// `layers_per_block` of the UNet (2 for SD1.5 and SDXL), for SGM names.
    pub layers_per_block: usize,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f64,
    /// Training resolution.
    pub resolution: u32,
    /// Steps trained.
    pub steps: u64,
    /// Unix seconds when training started and finished.
    pub started_at: u64,
    /// Unix seconds when training finished.
    pub finished_at: u64,
    /// Output name / title (the job name).
    pub title: String,
    /// The trigger word (goes into the file the customer receives, nowhere else).
    pub trigger_word: String,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// `constant` / `cosine`.
    pub lr_scheduler: String,
    /// Warmup steps.
    pub lr_warmup_steps: u64,
    /// Seed.
    pub seed: u64,
    /// Images trained on.
    pub num_images: usize,
    /// Batch size.
    pub batch_size: u32,
    /// `fp32`/`fp16`/`bf16`: what the run computed in.
    pub mixed_precision: String,
    /// Whether the UNet's blocks were checkpointed.
    pub gradient_checkpointing: bool,
    /// Noise offset.
    pub noise_offset: f64,
    /// Min-SNR gamma.
    pub min_snr_gamma: Option<f64>,
    /// `epsilon`, `v` or `flow`.
    pub prediction_type: String,
    /// FLUX.1 only: which variant was trained (architecture name and licence in the metadata).
    pub flux_variant: Option<FluxVariant>,
    /// The base weights' licence as the platform states it; absent: the variant's published one.
    pub licence: Option<String>,
    /// FLUX.1-dev only: the guidance value trained with.
    pub guidance_scale: Option<f64>,
    /// FLUX.1 only: how σ was drawn, in kohya's words (`uniform`, `sigmoid`, `flux_shift`).
    pub timestep_sampling: Option<String>,
}

/// The FLUX.1 variants, told apart by their weights (dev embeds guidance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FluxVariant {
    /// Guidance-distilled; non-commercial licence unless the service holds a commercial one.
    Dev,
    /// Timestep-distilled; Apache-2.0.
    Schnell,
}

impl FluxVariant {
    fn architecture(self) -> &'static str {
        match self {
            FluxVariant::Dev => "flux-1-dev/lora",
            FluxVariant::Schnell => "flux-1-schnell/lora",
        }
    }

    fn licence(self) -> &'static str {
        match self {
            FluxVariant::Dev => "flux-1-dev-non-commercial-license",
            FluxVariant::Schnell => "apache-2.0",
        }
    }
}

/// Maps a diffusers UNet module path inside an attention block to its SGM name.
pub fn diffusers_to_sgm(path: &str, layers_per_block: usize) -> Option<String> {
    let parts: Vec<&str> = path.splitn(5, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    let per = layers_per_block + 1;
    match parts.as_slice() {
        ["down_blocks", i, "attentions", j, rest] => {
            let n = 1 + num(i)? * per + num(j)?;
            Some(format!("input_blocks.{n}.1.{rest}"))
        }
        ["up_blocks", i, "attentions", j, rest] => {
            let n = num(i)? * per + num(j)?;
            Some(format!("output_blocks.{n}.1.{rest}"))
        }
        _ => {
            let rest = path.strip_prefix("mid_block.attentions.0.")?;
            Some(format!("middle_block.1.{rest}"))
        }
    }
}

/// The kohya module name (`lora_unet_…`) for an adapter.
pub fn kohya_name(
    path: &str,
    family: ModelFamily,
    layers_per_block: usize,
) -> Result<String, ExportError> {
    let module = match family {
        ModelFamily::Sd15 => path.to_string(),
        ModelFamily::Sdxl => diffusers_to_sgm(path, layers_per_block)
            .ok_or_else(|| ExportError::MapModuleName(path.to_string()))?,
        ModelFamily::Flux1 => {
            let (module, _, _) = flux_kohya_module(path)
                .ok_or_else(|| ExportError::MapModuleName(path.to_string()))?;
            module
        }
    };
    Ok(format!("lora_unet_{}", module.replace('.', "_")))
}

/// A FLUX.1 diffusers module path as Black Forest Labs names it: (module, the adapter's part
/// in that module, the module's part count). Fused modules list their parts in output order:
/// `img_attn_qkv` = (q, k, v), `single_blocks.N.linear1` = (q, k, v, MLP input).
pub fn flux_kohya_module(path: &str) -> Option<(String, usize, usize)> {
    let parts: Vec<&str> = path.splitn(3, '.').collect();
    let (kind, n, rest) = match parts.as_slice() {
        [kind, n, rest] => (*kind, n.parse::<usize>().ok()?, *rest),
        _ => return None,
    };
    let (name, part, count) = match (kind, rest) {
        ("transformer_blocks", r) => {
            let (name, part, count) = match r {
                "attn.to_q" => ("img_attn.qkv", 0, 3),
                "attn.to_k" => ("img_attn.qkv", 1, 3),
                "attn.to_v" => ("img_attn.qkv", 2, 3),
                "attn.add_q_proj" => ("txt_attn.qkv", 0, 3),
                "attn.add_k_proj" => ("txt_attn.qkv", 1, 3),
                "attn.add_v_proj" => ("txt_attn.qkv", 2, 3),
                "attn.to_out.0" => ("img_attn.proj", 0, 1),
                "attn.to_add_out" => ("txt_attn.proj", 0, 1),
                "ff.net.0.proj" => ("img_mlp.0", 0, 1),
                "ff.net.2" => ("img_mlp.2", 0, 1),
                "ff_context.net.0.proj" => ("txt_mlp.0", 0, 1),
                "ff_context.net.2" => ("txt_mlp.2", 0, 1),
                _ => return None,
            };
            (format!("double_blocks.{n}.{name}"), part, count)
        }
        ("single_transformer_blocks", r) => {
            let (name, part, count) = match r {
                "attn.to_q" => ("linear1", 0, 4),
                "attn.to_k" => ("linear1", 1, 4),
                "attn.to_v" => ("linear1", 2, 4),
                "proj_mlp" => ("linear1", 3, 4),
                "proj_out" => ("linear2", 0, 1),
                _ => return None,
            };
            (format!("single_blocks.{n}.{name}"), part, count)
        }
        _ => return None,
    };
    Some((name, part, count))
}

/// FLUX.1 adapters grouped into Black Forest Labs' modules: one adapter of rank parts × r per
/// module, `lora_down` the parts' rows stacked, `lora_up` block-diagonal (a part that was not
/// trained contributes zeros), alpha scaled by the part count so alpha/rank stays each part's.
fn fuse_flux(adapters: &[ExportAdapter], rank: u32) -> Result<Vec<ExportAdapter>, ExportError> {
    let r = rank as usize;
    // module -> (part count, input width, parts: (out width, adapter))
    let mut modules: BTreeMap<String, (usize, usize, Vec<Option<&ExportAdapter>>)> =
        BTreeMap::new();
    for a in adapters {
        let (module, part, count) =
            flux_kohya_module(&a.path).ok_or_else(|| ExportError::MapModuleName(a.path.clone()))?;
        let entry = modules
            .entry(module)
            .or_insert_with(|| (count, a.down.shape[1], vec![None; count]));
        entry.2[part] = Some(a);
    }
    let mut out = Vec::with_capacity(modules.len());
    for (module, (count, in_dim, parts)) in modules {
        if count == 1 {
            if let Some(a) = parts[0] {
                out.push(ExportAdapter {
                    path: module,
                    ..a.clone()
                });
            }
            continue;
        }
        // Untrained parts have the fused linear's widths: q, k, v the model width, the
        // single blocks' MLP input 4x.
        let widths: Vec<usize> = (0..count)
            .map(|i| parts[i].map_or(if i == 3 { 4 * in_dim } else { in_dim }, |a| a.up.shape[0]))
            .collect();
        let total: usize = widths.iter().sum();
        let fused_rank = count * r;
        let mut down = vec![0f32; fused_rank * in_dim];
        let mut up = vec![0f32; total * fused_rank];
        let mut row = 0;
        let mut alpha = 0.0;
        for (i, part) in parts.iter().enumerate() {
            if let Some(a) = part {
                down[i * r * in_dim..(i + 1) * r * in_dim].copy_from_slice(&a.down.data);
                for o in 0..widths[i] {
                    let dst = (row + o) * fused_rank + i * r;
                    up[dst..dst + r].copy_from_slice(&a.up.data[o * r..(o + 1) * r]);
                }
                alpha = a.alpha;
            }
            row += widths[i];
        }
        out.push(ExportAdapter {
            path: module,
            down: HostTensor {
                shape: vec![fused_rank, in_dim],
                data: down,
            },
            up: HostTensor {
                shape: vec![total, fused_rank],
                data: up,
            },
            alpha: alpha * count as f64,
            conv1x1: false,
        });
    }
    Ok(out)
}

fn check(a: &ExportAdapter, rank: u32) -> Result<(), ExportError> {
    let bad = |reason: String| ExportError::CheckShapes {
        path: a.path.clone(),
        reason,
    };
    let r = rank as usize;
    if a.down.shape.len() != 2
        || a.up.shape.len() != 2
        || a.down.shape[0] != r
        || a.up.shape[1] != r
    {
        return Err(bad(format!(
            "down {:?} / up {:?} do not fit rank {rank}",
            a.down.shape, a.up.shape
        )));
    }
    Ok(())
}

fn with_conv_dims(t: &HostTensor, conv: bool) -> HostTensor {
    let mut t = t.clone();
    if conv {
        t.shape.extend([1, 1]);
    }
    t
}

fn fmt_f(x: f64) -> String {
    // kohya writes Python floats; keep a decimal point so readers parse a float.
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// ISO 8601 UTC (`2026-11-22T07:41:08`) for unix seconds.
pub fn iso8601(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `ss_*` and `modelspec.*` metadata shared by both files.
pub fn metadata(info: &ExportInfo) -> BTreeMap<String, String> {
    let (base, arch, implementation) = match (info.family, info.flux_variant) {
        (ModelFamily::Sd15, _) => ("sd_v1", "stable-diffusion-v1/lora", "diffusers"),
        (ModelFamily::Sdxl, _) => (
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
        ),
        (ModelFamily::Flux1, variant) => (
            "flux1",
            variant.unwrap_or(FluxVariant::Dev).architecture(),
            "https://github.com/black-forest-labs/flux",
        ),
    };
    let r = info.resolution;
    let tags = serde_json::json!({ "dataset": { info.trigger_word.clone(): info.num_images } });
    let pairs: Vec<(&str, String)> = vec![
        ("ss_network_module", "networks.lora".into()),
        ("ss_network_dim", info.rank.to_string()),
        ("ss_network_alpha", fmt_f(info.alpha)),
        ("ss_base_model_version", base.into()),
        ("ss_v2", "False".into()),
        ("ss_resolution", format!("({r}, {r})")),
        ("ss_max_train_steps", info.steps.to_string()),
        ("ss_steps", info.steps.to_string()),
        ("ss_training_started_at", fmt_f(info.started_at as f64)),
        ("ss_training_finished_at", fmt_f(info.finished_at as f64)),
        ("ss_learning_rate", info.learning_rate.to_string()),
        ("ss_unet_lr", info.learning_rate.to_string()),
        ("ss_network_train_unet_only", "True".into()),
        ("ss_lr_scheduler", info.lr_scheduler.clone()),
        ("ss_lr_warmup_steps", info.lr_warmup_steps.to_string()),
        ("ss_optimizer", "AdamW(weight_decay=0.01)".into()),
        ("ss_max_grad_norm", "1.0".into()),
        ("ss_seed", info.seed.to_string()),
        ("ss_num_train_images", info.num_images.to_string()),
        ("ss_batch_size_per_device", info.batch_size.to_string()),
        ("ss_mixed_precision", info.mixed_precision.clone()),
        (
            "ss_gradient_checkpointing",
            if info.gradient_checkpointing {
                "True"
            } else {
                "False"
            }
            .into(),
        ),
        ("ss_noise_offset", info.noise_offset.to_string()),
        (
            "ss_min_snr_gamma",
            info.min_snr_gamma.map_or("None".into(), |g| g.to_string()),
        ),
        ("ss_output_name", info.title.clone()),
        ("ss_tag_frequency", tags.to_string()),
        ("modelspec.sai_model_spec", "1.0.0".into()),
        ("modelspec.architecture", arch.into()),
        ("modelspec.implementation", implementation.into()),
        ("modelspec.title", info.title.clone()),
        ("modelspec.date", iso8601(info.finished_at)),
        ("modelspec.resolution", format!("{r}x{r}")),
        ("modelspec.prediction_type", info.prediction_type.clone()),
        ("modelspec.trigger_phrase", info.trigger_word.clone()),
    ];
    let mut out: BTreeMap<String, String> =
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    if let Some(variant) = info.flux_variant {
        let licence = info.licence.as_deref().unwrap_or(variant.licence());
        out.insert("modelspec.license".into(), licence.into());
        out.insert("ss_network_args".into(), "{}".into());
        if let Some(g) = info.guidance_scale {
            out.insert("ss_guidance_scale".into(), g.to_string());
        }
        if let Some(t) = &info.timestep_sampling {
            out.insert("ss_timestep_sampling".into(), t.clone());
        }
        out.insert("ss_model_prediction_type".into(), "raw".into());
    }
    out
}

/// The kohya-format file.
pub fn kohya(adapters: &[ExportAdapter], info: &ExportInfo) -> Result<TensorFile, ExportError> {
    let mut f = TensorFile {
        metadata: metadata(info),
        ..TensorFile::default()
    };
    for a in adapters {
        check(a, info.rank)?;
    }
    let fused;
    let named: Vec<(String, &ExportAdapter)> = if info.family == ModelFamily::Flux1 {
        // Fused modules already carry Black Forest Labs' names.
        fused = fuse_flux(adapters, info.rank)?;
        fused
            .iter()
            .map(|a| (format!("lora_unet_{}", a.path.replace('.', "_")), a))
            .collect()
    } else {
        adapters
            .iter()
            .map(|a| Ok((kohya_name(&a.path, info.family, info.layers_per_block)?, a)))
            .collect::<Result<_, ExportError>>()?
    };
    for (name, a) in named {
        f.tensors.insert(
            format!("{name}.lora_down.weight"),
            with_conv_dims(&a.down, a.conv1x1),
        );
        f.tensors.insert(
            format!("{name}.lora_up.weight"),
            with_conv_dims(&a.up, a.conv1x1),
        );
        f.tensors.insert(
            format!("{name}.alpha"),
            HostTensor {
                shape: vec![],
                data: vec![a.alpha as f32],
            },
        );
    }
    Ok(f)
}

/// The diffusers/PEFT-format file (`unet.<path>.lora_A.weight` / `lora_B.weight`, FLUX.1:
/// `transformer.<path>…`), with alpha/rank folded into `lora_B` because PEFT assumes
/// alpha = rank when loading.
pub fn peft(adapters: &[ExportAdapter], info: &ExportInfo) -> Result<TensorFile, ExportError> {
    let mut f = TensorFile {
        metadata: metadata(info),
        ..TensorFile::default()
    };
    f.metadata.insert("format".into(), "pt".into());
    let network = match info.family {
        ModelFamily::Flux1 => "transformer",
        ModelFamily::Sd15 | ModelFamily::Sdxl => "unet",
    };
    for a in adapters {
        check(a, info.rank)?;
        let scale = (a.alpha / f64::from(info.rank)) as f32;
        let mut up = with_conv_dims(&a.up, a.conv1x1);
        up.data.iter_mut().for_each(|x| *x *= scale);
        f.tensors.insert(
            format!("{network}.{}.lora_A.weight", a.path),
            with_conv_dims(&a.down, a.conv1x1),
        );
        f.tensors
            .insert(format!("{network}.{}.lora_B.weight", a.path), up);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_sgm_names_match_comfyui_and_a1111() {
        let m = |p: &str| diffusers_to_sgm(p, 2).unwrap();
        // Names as they appear in SDXL LoRAs trained with kohya sd-scripts.
        assert_eq!(
            m("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            m("down_blocks.1.attentions.1.proj_in"),
            "input_blocks.5.1.proj_in"
        );
        assert_eq!(
            m("down_blocks.2.attentions.0.transformer_blocks.9.ff.net.0.proj"),
            "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj"
        );
        assert_eq!(
            m("down_blocks.2.attentions.1.proj_out"),
            "input_blocks.8.1.proj_out"
        );
        assert_eq!(
            m("mid_block.attentions.0.transformer_blocks.3.attn2.to_k"),
            "middle_block.1.transformer_blocks.3.attn2.to_k"
        );
        assert_eq!(
            m("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
            "output_blocks.0.1.transformer_blocks.0.attn2.to_out.0"
        );
        assert_eq!(
            m("up_blocks.0.attentions.2.proj_in"),
            "output_blocks.2.1.proj_in"
        );
        assert_eq!(
            m("up_blocks.1.attentions.0.proj_in"),
            "output_blocks.3.1.proj_in"
        );
        assert_eq!(
            m("up_blocks.1.attentions.2.ff.net.2"),
            "output_blocks.5.1.ff.net.2"
        );
        // SD1.5's layout (attention in down blocks 0-2, up blocks 1-3) maps the same way.
        assert_eq!(
            m("down_blocks.0.attentions.0.proj_in"),
            "input_blocks.1.1.proj_in"
        );
        assert_eq!(
            m("up_blocks.3.attentions.2.proj_out"),
            "output_blocks.11.1.proj_out"
        );
        assert_eq!(diffusers_to_sgm("down_blocks.0.resnets.0.conv1", 2), None);
        assert_eq!(
            kohya_name(
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
                ModelFamily::Sdxl,
                2
            )
            .unwrap(),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"
        );
        assert_eq!(
            kohya_name(
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
                ModelFamily::Sd15,
                2
            )
            .unwrap(),
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v"
        );
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00");
        assert_eq!(iso8601(1_795_332_068), "2026-11-22T07:21:08");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00");
    }
}
