//! The ldmatrix/mma.sync tile GEMM (`kernels-cu/mma_gemm.cu`): groundwork for flash attention,
//! tested against the CPU GEMM (`cpu/gemm.rs`). Production GEMMs go to [`Gpu::gemm`] (`matmul.rs`).

use super::launch::{dptr, grid_x, grid_y, launch};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

/// `MmaTileGemmParams` of `mma_gemm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MmaTileGemmParams {
    a: DevicePtr, // (m, k) bf16
    b: DevicePtr, // (n, k) bf16
    c: DevicePtr, // (m, n) f32
    m: u64,
    n: u64,
    k: u64,
}
const _: () = assert!(std::mem::size_of::<MmaTileGemmParams>() == 48);

/// The mma tile GEMM: 4 warps per 64×64 output tile.
pub const MMA_TILE: usize = 64;
pub const MMA_BLOCK: u32 = 128;

// ---- the mma tile GEMM test kernel --------------------------------------------------------------

/// `c [m, n] = a [m, k] · b [n, k]ᵀ` with the 64×64 ldmatrix/mma.sync tile kernel (bf16 in,
/// fp32 out). Groundwork for flash attention; production GEMMs go to [`Gpu::gemm`].
pub fn mma_tile_gemm<G: Gpu>(gpu: &Arc<G>, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    const OP: &str = "mma_tile_gemm";
    let (&[m, k], &[n, k2]) = (a.shape(), b.shape()) else {
        return Err(Error::shape(
            OP,
            format!("a {:?} and b {:?} must be 2-D", a.shape(), b.shape()),
        ));
    };
    if k != k2 || c.shape() != [m, n] {
        return Err(Error::shape(
            OP,
            format!("a {:?}, b {:?} and c {:?} do not fit a·bᵀ", a.shape(), b.shape(), c.shape()),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let p = MmaTileGemmParams {
        a: dptr(gpu, OP, a, DType::BF16, m * k)?,
        b: dptr(gpu, OP, b, DType::BF16, n * k)?,
        c: dptr(gpu, OP, c, DType::F32, m * n)?,
        m: m as u64,
        n: n as u64,
        k: k as u64,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::xy(grid_x(OP, n.div_ceil(MMA_TILE))?, grid_y(OP, m.div_ceil(MMA_TILE))?),
        block: Dim3::x(MMA_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "mma_tile_gemm_bf16", cfg, &p)
}
