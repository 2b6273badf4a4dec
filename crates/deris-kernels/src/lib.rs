//! Custom tensor ops for deris (in progress).
