def bucket_candidates_cpu(x, buckets, k_per_bucket, interleaved, by_magnitude):
    return None  # replaced by the C++ kernel shortly
