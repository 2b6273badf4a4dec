//! Run-time CPU dispatch for the hand-written loops. The crate is built for the baseline x86-64
//! target (SSE2), so a loop only uses AVX2/FMA registers when its body is compiled inside a
//! `#[target_feature]` function: [`with_avx2!`](crate::with_avx2) defines such a twin of a
//! function and picks it when the CPU has the features. No arithmetic changes (Rust never fuses
//! `a·b + c` into an FMA on its own), only the width of the vector registers.

/// Whether this CPU runs AVX2 and FMA instructions (cached by the standard library).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `with_avx2!([pub(crate)] fn name<T: Bound>(args) -> Ret => body)` defines `name`, which calls the
/// `#[inline(always)]` function `body` compiled for AVX2+FMA when the CPU has them, and the
/// baseline build of `body` otherwise.
#[macro_export]
#[doc(hidden)]
macro_rules! with_avx2 {
    ($vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::simd::has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
