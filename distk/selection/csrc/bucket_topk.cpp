// First stage of bucketed top-k on the CPU: every bucket keeps its k_per_bucket largest
// entries, reading the input once. Behaviour is defined by distk/selection/reference.py;
// this file must produce the same composite keys.
//
// Layout of the work: for interleaved buckets, row t of the (L, buckets) view is a
// contiguous slice, so each thread streams its share of every row and compares a block
// of keys against the per-bucket thresholds with SIMD; the rare entry that beats its
// bucket's threshold is inserted into that bucket's small sorted list. Contiguous
// buckets stream each bucket against one scalar threshold.
//
// Fused error feedback (fp32 only): with an `add` input the kernel first adds it to x in
// place, block by block (x += add, one IEEE fp32 add per entry, as torch's add_), and
// selects on the sum; the residual accumulation and the selection then share one pass.
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int32_t kPadKey32 = INT32_MIN;      // below every real key (see reference.py)
constexpr int64_t kPadKey64 = INT64_MIN;
constexpr int kBlock = 32;                     // entries compared per SIMD block

// Other dtypes (fp16, fp64) are converted to fp32 by the caller, as the reference does.
enum DType { kFloat32 = 0, kBFloat16 = 1 };

inline uint32_t bits_of(const float* __restrict x, int64_t i) {
    uint32_t b; std::memcpy(&b, x + i, 4); return b;
}
inline uint32_t bits_of(const uint16_t* x, int64_t i) {  // bfloat16
    return static_cast<uint32_t>(x[i]) << 16;
}

template <bool kMagnitude>
inline int32_t key_of(uint32_t bits) {
    const int32_t sbits = static_cast<int32_t>(bits);
    int32_t key = kMagnitude ? (sbits & 0x7fffffff) : (sbits ^ ((sbits >> 31) & 0x7fffffff));
    return ((bits & 0x7fffffffu) > 0x7f800000u) ? INT32_MAX : key;   // NaN ranks largest
}

inline int64_t composite(int32_t key, uint32_t pos) {
    if (key == kPadKey32) return kPadKey64;
    return static_cast<int64_t>((static_cast<uint64_t>(static_cast<int64_t>(key)) << 32)
                                | (0xffffffffull - pos));
}

// Bit j of the result is set when entry j of the kBlock entries at src beats its
// threshold. This is the hot loop; most blocks return 0.
#if defined(__AVX512F__) && defined(__AVX512BW__)
template <bool kMagnitude>
inline __m512i keys16(__m512i bits) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i abs_bits = _mm512_and_si512(bits, abs_mask);
    __m512i key = kMagnitude ? abs_bits
        : _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), abs_mask));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs_bits, _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(key, nan, abs_mask);
}
inline __m512i load_bits(const float* src) { return _mm512_loadu_si512(src); }
inline __m512i load_bits(const uint16_t* src) {
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(src))), 16);
}
template <typename T, bool kMagnitude>
inline uint32_t block_mask(const T* src, const int32_t* thr) {
    const __m512i k0 = keys16<kMagnitude>(load_bits(src));
    const __m512i k1 = keys16<kMagnitude>(load_bits(src + 16));
    return static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(k0, _mm512_loadu_si512(thr)))
         | (static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(k1, _mm512_loadu_si512(thr + 16))) << 16);
}
template <typename T, bool kMagnitude>
inline uint32_t block_mask(const T* src, int32_t thr) {
    const __m512i t = _mm512_set1_epi32(thr);
    const __m512i k0 = keys16<kMagnitude>(load_bits(src));
    const __m512i k1 = keys16<kMagnitude>(load_bits(src + 16));
    return static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(k0, t))
         | (static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(k1, t)) << 16);
}
#else
template <typename T, bool kMagnitude>
inline uint32_t block_mask(const T* __restrict src, const int32_t* __restrict thr) {
    int32_t keys[kBlock];
    int any = 0;
    #pragma omp simd reduction(|:any)
    for (int j = 0; j < kBlock; ++j) {
        keys[j] = key_of<kMagnitude>(bits_of(src, j));
        any |= keys[j] > thr[j];
    }
    if (!any) return 0;
    uint32_t mask = 0;
    for (int j = 0; j < kBlock; ++j) mask |= static_cast<uint32_t>(keys[j] > thr[j]) << j;
    return mask;
}
template <typename T, bool kMagnitude>
inline uint32_t block_mask(const T* __restrict src, int32_t thr) {
    int32_t keys[kBlock];
    int any = 0;
    #pragma omp simd reduction(|:any)
    for (int j = 0; j < kBlock; ++j) {
        keys[j] = key_of<kMagnitude>(bits_of(src, j));
        any |= keys[j] > thr;
    }
    if (!any) return 0;
    uint32_t mask = 0;
    for (int j = 0; j < kBlock; ++j) mask |= static_cast<uint32_t>(keys[j] > thr) << j;
    return mask;
}
#endif

// x[0:kBlock] += add[0:kBlock], in place (then block_mask reads the sums back from L1).
inline void accumulate_block(float* __restrict x, const float* __restrict add) {
    #pragma omp simd
    for (int j = 0; j < kBlock; ++j) x[j] = x[j] + add[j];
}

// The kept entries of one bucket, as composite keys: up to kHeapFrom slots a list sorted
// descending (one insertion touches one cache line); more slots a binary min-heap
// (log(kept) moves per insertion instead of up to kept), sorted once at the end; the
// heap serves the contiguous layout and the refill of a short bucket, KeptSets below the
// streaming interleaved passes. Returns the bucket's new threshold: the key part of its smallest kept key, never below
// the row's floor. An entry must have a strictly larger key to enter, so equal keys keep
// the earlier entry, as the reference orders them.
constexpr int kHeapFrom = 12;

inline int32_t insert(int64_t* slots, int kept, int32_t key, uint32_t pos, int32_t floor) {
    const int64_t c = composite(key, pos);
    if (kept <= kHeapFrom) {
        int i = kept - 1;
        while (i > 0 && slots[i - 1] < c) { slots[i] = slots[i - 1]; --i; }
        slots[i] = c;
        return std::max(floor, static_cast<int32_t>(slots[kept - 1] >> 32));
    }
    int i = 0;  // c replaces the root (the smallest) and sinks
    for (;;) {
        int child = 2 * i + 1;
        if (child >= kept) break;
        if (child + 1 < kept && slots[child + 1] < slots[child]) ++child;
        if (slots[child] >= c) break;
        slots[i] = slots[child];
        i = child;
    }
    slots[i] = c;
    return std::max(floor, static_cast<int32_t>(slots[0] >> 32));
}

inline void finish(int64_t* slots, int kept) {
    if (kept > kHeapFrom) std::sort(slots, slots + kept, std::greater<int64_t>());
}

// The kept entries of `width` buckets during one streaming pass (slots: bucket 0's).
// kBuffered false (up to kHeapFrom slots): the sorted lists of insert(). True: each bucket appends its
// candidates to a buffer of 2 * kept; a full buffer is cut back to its kept best
// (nth_element) and the bucket's threshold rises to the smallest of those. That is
// amortised O(1) per candidate, without the unpredictable branches of a heap, and gives
// the same kept set: an entry is dropped only when kept larger keys were seen first.
template <bool kBuffered>
class KeptSets {
  public:
    KeptSets(int64_t* slots, int64_t width, int kept)
        : slots_(slots), kept_(kept), cap_(2 * kept) {
        if constexpr (kBuffered) {
            buffer_.resize(static_cast<size_t>(width) * cap_);
            count_.assign(width, 0);
        }
    }
    // Bucket w takes (key, pos), which beats its threshold; returns the new threshold.
    int32_t add(int64_t w, int32_t key, uint32_t pos, int32_t thr, int32_t floor) {
        if constexpr (!kBuffered) return insert(slots_ + w * kept_, kept_, key, pos, floor);
        int64_t* b = buffer_.data() + w * cap_;
        int32_t& n = count_[w];
        b[n++] = composite(key, pos);
        if (n < cap_) return thr;
        std::nth_element(b, b + (kept_ - 1), b + cap_, std::greater<int64_t>());
        n = kept_;
        return std::max(floor, static_cast<int32_t>(b[kept_ - 1] >> 32));
    }
    // Writes every bucket's best kept entries, sorted descending and padded, to its slots.
    void emit(int64_t width) {
        if constexpr (!kBuffered) return;
        for (int64_t w = 0; w < width; ++w) {
            int64_t* b = buffer_.data() + w * cap_;
            const int m = std::min(count_[w], kept_);
            std::partial_sort(b, b + m, b + count_[w], std::greater<int64_t>());
            std::copy(b, b + m, slots_ + w * kept_);
            std::fill(slots_ + w * kept_ + m, slots_ + (w + 1) * kept_, kPadKey64);
        }
    }
  private:
    int64_t* slots_;
    int kept_, cap_;
    std::vector<int64_t> buffer_;
    std::vector<int32_t> count_;
};

// Last step of an interleaved run over buckets [j0, j1) (slots: bucket j0's, already
// sorted by KeptSets::emit): a bucket the floor left with an empty slot is redone
// without it (refill) and sorted again.
template <typename T, bool kMagnitude>
void finish_interleaved(const T* row, int64_t n, int64_t buckets, int64_t j0, int64_t j1,
                        int kept, int32_t floor, bool refill, int64_t* slots) {
    for (int64_t w = 0; w < j1 - j0; ++w) {
        int64_t* s = slots + w * kept;
        if (refill && floor != kPadKey32 && *std::min_element(s, s + kept) == kPadKey64) {
            // Too few entries above the floor: redo this bucket without it.
            std::fill(s, s + kept, kPadKey64);
            int32_t t = kPadKey32;
            for (int64_t p = j0 + w; p < n; p += buckets) {
                const int32_t key = key_of<kMagnitude>(bits_of(row, p));
                if (key > t) t = insert(s, kept, key, static_cast<uint32_t>(p), kPadKey32);
            }
            finish(s, kept);
        }
    }
}

template <typename T, bool kMagnitude, bool kAdd, bool kBuffered>
void interleaved_chunk(T* row, const float* add, int64_t n, int64_t buckets, int64_t j0,
                       int64_t j1, int kept, int32_t floor, bool refill, int64_t* out) {
    const int64_t width = j1 - j0;
    std::vector<int32_t> thr(width, floor);
    int64_t* slots = out + j0 * kept;        // written in place: bucket j's slots
    std::fill(slots, slots + width * kept, kPadKey64);
    KeptSets<kBuffered> sets(slots, width, kept);
    const int64_t length = (n + buckets - 1) / buckets;
    for (int64_t t = 0; t < length; ++t) {
        const int64_t base = t * buckets;
        const int64_t hi = std::min(j1, n - base);
        for (int64_t jb = j0; jb < hi; jb += kBlock) {
            const int64_t je = std::min(jb + kBlock, hi);
            if (je - jb == kBlock) {
                if constexpr (kAdd) accumulate_block(row + base + jb, add + base + jb);
                uint32_t mask = block_mask<T, kMagnitude>(row + base + jb, &thr[jb - j0]);
                while (mask) {
                    const int64_t j = jb + __builtin_ctz(mask);
                    mask &= mask - 1;
                    const int32_t key = key_of<kMagnitude>(bits_of(row, base + j));
                    const int64_t w = j - j0;
                    // Lanes are distinct buckets: an insertion cannot change another
                    // lane's threshold, so the mask stays valid.
                    thr[w] = sets.add(w, key, static_cast<uint32_t>(base + j), thr[w], floor);
                }
                continue;
            }
            for (int64_t j = jb; j < je; ++j) {
                if constexpr (kAdd) row[base + j] = row[base + j] + add[base + j];
                const int32_t key = key_of<kMagnitude>(bits_of(row, base + j));
                const int64_t w = j - j0;
                if (key > thr[w])
                    thr[w] = sets.add(w, key, static_cast<uint32_t>(base + j), thr[w], floor);
            }
        }
    }
    sets.emit(width);
    finish_interleaved<T, kMagnitude>(row, n, buckets, j0, j1, kept, floor, refill, slots);
}

// Interleaved buckets with short rows (buckets < kFlatBelow), one thread per row: the row
// is streamed as one flat array, 32 entries per block whatever the bucket width, so no
// scalar tail per row of `buckets` entries. Lane l of the block at position p belongs
// to bucket (p + l) mod buckets; thr holds the thresholds repeated (thr[i] is bucket
// i mod buckets, for i < buckets + kBlock) so each block compares against a contiguous
// slice. With fewer than 32 buckets a block holds a bucket more than once, so every
// candidate is checked again against its bucket's current threshold before insertion.
constexpr int64_t kFlatBelow = 256;

template <typename T, bool kMagnitude, bool kAdd, bool kBuffered>
void interleaved_flat(T* row, const float* add, int64_t n, int64_t buckets, int kept,
                      int32_t floor, bool refill, int64_t* out) {
    std::vector<int32_t> thr(buckets + kBlock, floor);
    std::fill(out, out + buckets * kept, kPadKey64);
    KeptSets<kBuffered> sets(out, buckets, kept);
    auto consider = [&](int64_t p, int64_t j) {
        const int32_t key = key_of<kMagnitude>(bits_of(row, p));
        if (key <= thr[j]) return;
        const int32_t t = sets.add(j, key, static_cast<uint32_t>(p), thr[j], floor);
        for (int64_t i = j; i < buckets + kBlock; i += buckets) thr[i] = t;
    };
    int64_t first = 0;  // bucket of position p
    int64_t p = 0;
    for (; p + kBlock <= n; p += kBlock) {
        if constexpr (kAdd) accumulate_block(row + p, add + p);
        uint32_t mask = block_mask<T, kMagnitude>(row + p, &thr[first]);
        while (mask) {
            const int lane = __builtin_ctz(mask);
            mask &= mask - 1;
            int64_t j = first + lane;
            while (j >= buckets) j -= buckets;
            consider(p + lane, j);
        }
        first += kBlock;
        while (first >= buckets) first -= buckets;
    }
    for (; p < n; ++p) {
        if constexpr (kAdd) row[p] = row[p] + add[p];
        consider(p, first);
        if (++first == buckets) first = 0;
    }
    sets.emit(buckets);
    finish_interleaved<T, kMagnitude>(row, n, buckets, 0, buckets, kept, floor, refill, out);
}

template <typename T, bool kMagnitude, bool kAdd>
void contiguous_bucket(T* row, const float* add, int64_t n, int64_t buckets, int64_t j,
                       int kept, int32_t floor, bool refill, int64_t* out) {
    const int64_t start = j * n / buckets, end = (j + 1) * n / buckets;
    int64_t* slots = out + j * kept;
    std::fill(slots, slots + kept, kPadKey64);
    int32_t thr = floor;
    for (int64_t ib = start; ib < end; ib += kBlock) {
        const int64_t ie = std::min(ib + kBlock, end);
        if (ie - ib == kBlock) {
            if constexpr (kAdd) accumulate_block(row + ib, add + ib);
            uint32_t mask = block_mask<T, kMagnitude>(row + ib, thr);
            // One bucket: each insertion raises the threshold, so re-check every candidate.
            while (mask) {
                const int64_t i = ib + __builtin_ctz(mask);
                mask &= mask - 1;
                const int32_t key = key_of<kMagnitude>(bits_of(row, i));
                if (key > thr) thr = insert(slots, kept, key, static_cast<uint32_t>(i), floor);
            }
            continue;
        }
        for (int64_t i = ib; i < ie; ++i) {
            if constexpr (kAdd) row[i] = row[i] + add[i];
            const int32_t key = key_of<kMagnitude>(bits_of(row, i));
            if (key > thr) thr = insert(slots, kept, key, static_cast<uint32_t>(i), floor);
        }
    }
    if (refill && floor != kPadKey32 && *std::min_element(slots, slots + kept) == kPadKey64) {
        // The bucket already holds the sums: redo it without adding again.
        contiguous_bucket<T, kMagnitude, false>(row, nullptr, n, buckets, j, kept, kPadKey32,
                                                false, out);
        return;  // redone without the floor (and finished) above
    }
    finish(slots, kept);
}

template <typename T, bool kMagnitude, bool kAdd>
void run(T* x, const float* add, int64_t rows, int64_t n, int64_t row_stride, int64_t buckets,
         int kept, bool interleaved, const int32_t* floors, bool refill, int64_t* out,
         int threads) {
    if (interleaved) {
        // Each thread streams whole contiguous segments of every row (tiling the buckets
        // into cache-sized chunks measured slower: the strided reads miss the TLB).
        const int64_t min_width = 256;
        int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, buckets / min_width));
        if (rows >= threads) chunks = 1;
        const int64_t width = (buckets + chunks - 1) / chunks;
        if (chunks == 1 && buckets < kFlatBelow) {
            #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
            for (int64_t r = 0; r < rows; ++r)
                (kept > kHeapFrom ? interleaved_flat<T, kMagnitude, kAdd, true>
                                  : interleaved_flat<T, kMagnitude, kAdd, false>)(
                    x + r * row_stride, kAdd ? add + r * row_stride : nullptr, n, buckets,
                    kept, floors ? floors[r] : kPadKey32, refill, out + r * buckets * kept);
            return;
        }
        #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) collapse(2)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < chunks; ++c) {
                const int64_t j0 = c * width, j1 = std::min(buckets, j0 + width);
                if (j0 < j1)
                    (kept > kHeapFrom ? interleaved_chunk<T, kMagnitude, kAdd, true>
                                      : interleaved_chunk<T, kMagnitude, kAdd, false>)(
                        x + r * row_stride, kAdd ? add + r * row_stride : nullptr,
                        n, buckets, j0, j1, kept,
                        floors ? floors[r] : kPadKey32, refill,
                        out + r * buckets * kept);
            }
    } else {
        #pragma omp parallel for schedule(dynamic, 16) num_threads(threads) collapse(2)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < buckets; ++j)
                contiguous_bucket<T, kMagnitude, kAdd>(x + r * row_stride,
                                                       kAdd ? add + r * row_stride : nullptr,
                                                       n, buckets, j, kept,
                                                       floors ? floors[r] : kPadKey32, refill,
                                                       out + r * buckets * kept);
    }
}

template <typename T, bool kAdd>
void dispatch_magnitude(void* x, const float* add, int64_t rows, int64_t n, int64_t row_stride,
                        int64_t buckets, int kept, bool interleaved, bool by_magnitude,
                        const int32_t* floors, bool refill, int64_t* out, int threads) {
    T* data = static_cast<T*>(x);
    if (by_magnitude) run<T, true, kAdd>(data, add, rows, n, row_stride, buckets, kept, interleaved, floors, refill, out, threads);
    else run<T, false, kAdd>(data, add, rows, n, row_stride, buckets, kept, interleaved, floors, refill, out, threads);
}

}  // namespace

extern "C" {

// floors: null, or one int32 key per row; entries whose key is not above their row's
// floor are ignored (see reference.py). refill: a bucket left with an empty slot under a
// floor is redone without it, so the floor never changes the result (per-bucket top-k).
// add: null, or an fp32 tensor laid out like x (same row_stride) that is added to x in
// place before selecting (x must be fp32 then). Returns 0 on success, -1 for an
// unsupported dtype, -2 for `add` with a non-fp32 x.
int distk_bucket_candidates(void* x, int dtype, int64_t rows, int64_t n,
                            int64_t row_stride, int64_t buckets, int64_t kept,
                            int interleaved, int by_magnitude, const int32_t* floors,
                            int refill, int64_t* out, int threads, const float* add) {
    const int k = static_cast<int>(kept);
    switch (dtype) {
        case kFloat32:
            if (add)
                dispatch_magnitude<float, true>(x, add, rows, n, row_stride, buckets, k, interleaved, by_magnitude, floors, refill != 0, out, threads);
            else
                dispatch_magnitude<float, false>(x, nullptr, rows, n, row_stride, buckets, k, interleaved, by_magnitude, floors, refill != 0, out, threads);
            return 0;
        case kBFloat16:
            if (add) return -2;
            dispatch_magnitude<uint16_t, false>(x, nullptr, rows, n, row_stride, buckets, k, interleaved, by_magnitude, floors, refill != 0, out, threads);
            return 0;
        default:
            return -1;
    }
}

// Memory helper of the exchange's dense result: zero `bytes` bytes at p with the C
// library's memset, which streams past the cache for large sizes (several times faster
// than a store loop that reads each line first).
void distk_zero(void* p, int64_t bytes) { std::memset(p, 0, static_cast<size_t>(bytes)); }

}  // extern "C"
