//! The learning-rate schedule: a linear warm-up, then a cosine decay to a floor.
//!
//! ```text
//! step < warmup:            lr = max_lr · (step + 1) / warmup
//! warmup <= step < total:   lr = min_lr + ½(max_lr − min_lr)(1 + cos(π · progress)),
//!                           progress = (step − warmup) / (total − warmup)
//! step >= total:            lr = min_lr
//! ```
//!
//! Set `optimizer.config.lr = schedule.lr(step)` before each step.

/// Linear warm-up then cosine decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    /// The peak learning rate, reached at the end of the warm-up.
    pub max_lr: f32,
    /// The floor the cosine decays to.
    pub min_lr: f32,
    /// Steps of linear warm-up.
    pub warmup: u64,
    /// The step at which the decay reaches `min_lr`.
    pub total: u64,
}

impl CosineSchedule {
    /// The learning rate for step `step` (counting from 0).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.max_lr * (step + 1) as f32 / self.warmup as f32;
        }
        if step >= self.total || self.total <= self.warmup {
            return self.min_lr;
        }
        let progress = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.max_lr - self.min_lr) * cosine as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_peaks_and_decays() {
        let s = CosineSchedule { max_lr: 1.0, min_lr: 0.1, warmup: 10, total: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!(s.lr(109) > 0.1 && s.lr(109) < 0.11);
        assert_eq!(s.lr(500), 0.1);
        let mut prev = f32::INFINITY;
        for step in 10..110 {
            assert!(s.lr(step) <= prev);
            prev = s.lr(step);
        }
    }
}
