//! Element types. `F64` exists for gradient checks on the CPU; token ids are `I32`, `U16` or `U32`.

use half::bf16;
use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    I32,
    U16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::BF16 | DType::U16 => 2,
            DType::F64 => 8,
        }
    }

    /// Floating-point types take part in arithmetic ops; integer types are ids and targets.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F64)
    }

    /// The name used in safetensors headers and HF configs.
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I32 => "I32",
            DType::U16 => "U16",
            DType::U32 => "U32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be the element of a tensor.
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + 'static {
    const DTYPE: DType;
    /// Lossless or rounding conversion to f64 (used by comparisons and reductions in tests).
    fn as_f64(self) -> f64;
    /// Conversion from f64: floats round to nearest (even); integers truncate toward zero and
    /// saturate, as Rust's `as` does.
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn as_f64(self) -> f64 {
                ($to)(self)
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}

element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);
// Through f32: `half`'s `bf16::from_f64` rounds after dropping low mantissa bits, which
// misrounds f32 values just above a bf16 tie; f32 data (all Steel holds) converts exactly this way.
element!(bf16, BF16, |x: bf16| x.to_f64(), |v: f64| bf16::from_f32(v as f32));
element!(i32, I32, |x: i32| x as f64, |v: f64| v as i32);
element!(u16, U16, |x: u16| x as f64, |v: f64| v as u16);
element!(u32, U32, |x: u32| x as f64, |v: f64| v as u32);
