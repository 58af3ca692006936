/**
 * The figures heap-limits.ts applies, apart from it: importing heap-limits.ts changes the importing
 * process's V8 flags, which a test reading these must not do to its own worker.
 */

/** Both semi-spaces together (V8's new_space size), in bytes. */
export const YOUNG_GENERATION_CAP = 16 * 1024 * 1024;
/** --heap-growing-percent outside bulk streams. */
export const RPC_HEAP_GROWING_PERCENT = 20;
