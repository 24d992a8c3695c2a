//! Learning-rate schedules: the learning rate is a pure function of the optimizer step.
//!
//! Warmup and decay follow Hugging Face `transformers` (`get_*_schedule_with_warmup`): during
//! warmup the rate rises linearly from 0 at step 0; afterwards it decays over the remaining steps
//! towards `min_lr_ratio * lr`. The nanopoet form starts at `init_lr_frac * lr` and falls linearly
//! to 0 without warmup.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
    /// nanopoet / nanochat SFT: `lr * init_lr_frac * (1 - step / total)`.
    Nanopoet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// `cosine` by default: what axolotl and most SFT recipes use.
    #[serde(default = "default_kind")]
    pub kind: ScheduleKind,
    /// Warmup length in optimizer steps; exclusive with `warmup_ratio`.
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps (HF `warmup_ratio`).
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Floor of the decay as a fraction of the base rate (HF `cosine_with_min_lr`).
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Starting fraction of the base rate for the nanopoet schedule.
    #[serde(default = "default_init_lr_frac")]
    pub init_lr_frac: f64,
}

fn default_kind() -> ScheduleKind {
    ScheduleKind::Cosine
}

fn default_init_lr_frac() -> f64 {
    1.0
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: default_kind(),
            warmup_steps: None,
            warmup_ratio: None,
            min_lr_ratio: 0.0,
            init_lr_frac: default_init_lr_frac(),
        }
    }
}

impl ScheduleConfig {
    /// Checks the values; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.warmup_steps.is_some() && self.warmup_ratio.is_some() {
            return Err("schedule: set warmup_steps or warmup_ratio, not both".into());
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("schedule.warmup_ratio: {r} is outside [0, 1]"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!(
                "schedule.min_lr_ratio: {} is outside [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(self.init_lr_frac > 0.0 && self.init_lr_frac <= 1.0) {
            return Err(format!(
                "schedule.init_lr_frac: {} is outside (0, 1]",
                self.init_lr_frac
            ));
        }
        if self.kind == ScheduleKind::Nanopoet
            && (self.warmup_steps.unwrap_or(0) > 0 || self.warmup_ratio.unwrap_or(0.0) > 0.0)
        {
            return Err("schedule: the nanopoet schedule has no warmup".into());
        }
        Ok(())
    }

    pub fn warmup_steps(&self, total_steps: u64) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(n), _) => n,
            (None, Some(r)) => (r * total_steps as f64).ceil() as u64,
            (None, None) => 0,
        }
    }

    /// The learning rate for optimizer step `step` (0-based) of `total_steps`.
    pub fn lr(&self, base_lr: f64, step: u64, total_steps: u64) -> f64 {
        let warmup = self.warmup_steps(total_steps);
        if self.kind == ScheduleKind::Nanopoet {
            let progress = step as f64 / total_steps.max(1) as f64;
            return base_lr * self.init_lr_frac * (1.0 - progress).max(0.0);
        }
        if step < warmup {
            return base_lr * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total_steps.saturating_sub(warmup).max(1) as f64;
        let progress = progress.min(1.0);
        let decay = match self.kind {
            ScheduleKind::Constant => return base_lr,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Nanopoet => unreachable!("handled above"),
        };
        base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: ScheduleKind, warmup: Option<u64>) -> ScheduleConfig {
        ScheduleConfig {
            kind,
            warmup_steps: warmup,
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn warmup_is_linear_from_zero_like_transformers() {
        let c = cfg(ScheduleKind::Constant, Some(4));
        let lrs: Vec<f64> = (0..6).map(|s| c.lr(1.0, s, 10)).collect();
        assert_eq!(lrs, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn linear_and_cosine_reach_the_floor() {
        let mut c = cfg(ScheduleKind::Linear, Some(2));
        // transformers: lr(step) = (total - step) / (total - warmup) after warmup.
        assert_eq!(c.lr(1.0, 2, 10), 1.0);
        assert!((c.lr(1.0, 6, 10) - 0.5).abs() < 1e-12);
        assert_eq!(c.lr(1.0, 10, 10), 0.0);
        c.kind = ScheduleKind::Cosine;
        assert!((c.lr(1.0, 6, 10) - 0.5).abs() < 1e-12);
        assert!(
            (c.lr(1.0, 4, 10) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12
        );
        assert!(c.lr(1.0, 10, 10).abs() < 1e-12);
        c.min_lr_ratio = 0.1;
        assert!((c.lr(2.0, 10, 10) - 0.2).abs() < 1e-12);
        assert!((c.lr(2.0, 2, 10) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn warmup_ratio_rounds_up_and_nanopoet_starts_low() {
        let c = ScheduleConfig {
            warmup_ratio: Some(0.1),
            ..ScheduleConfig::default()
        };
        assert_eq!(c.warmup_steps(95), 10);
        let n = ScheduleConfig {
            kind: ScheduleKind::Nanopoet,
            init_lr_frac: 0.5,
            ..ScheduleConfig::default()
        };
        assert_eq!(n.lr(1.0, 0, 4), 0.5);
        assert_eq!(n.lr(1.0, 2, 4), 0.25);
        assert_eq!(n.lr(1.0, 4, 4), 0.0);
    }

    #[test]
    fn validation_names_the_key() {
        let c = ScheduleConfig {
            warmup_ratio: Some(1.5),
            ..ScheduleConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("warmup_ratio"));
        let c = ScheduleConfig {
            warmup_steps: Some(1),
            warmup_ratio: Some(0.1),
            ..ScheduleConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("not both"));
        let c = ScheduleConfig {
            min_lr_ratio: -0.1,
            ..ScheduleConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("min_lr_ratio"));
    }
}
