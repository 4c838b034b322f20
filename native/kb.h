/*
 * keybroker native hot path: key slots in locked memory, batch envelope
 * seal / open / rewrap (format 1, AES-256-GCM) and HMAC-SHA256.
 *
 * This header doubles as the cffi cdef: native/build.py strips the
 * preprocessor lines and feeds the rest to ffibuilder.cdef(), so keep it to
 * plain declarations (no macros, no inline functions).
 *
 * Batch layout: the items of a batch are passed as ONE contiguous buffer plus
 * either a per-item length array (uint64_t[n]) or, when the length array is
 * NULL, a uniform item length of total_len / n. The outputs are written into
 * ONE contiguous caller-provided buffer, in item order:
 *   seal:   item i -> envelope of len_i + KB_OVERHEAD bytes, packed;
 *   open:   item i -> plaintext of len_i - KB_OVERHEAD bytes (0 if the item
 *           is shorter than an envelope), packed;
 *   rewrap: item i -> envelope of exactly len_i bytes, packed (same layout as
 *           the input).
 * `status` receives one byte per item: KB_ITEM_OK or KB_ITEM_FAILED. A failed
 * item's output region is zeroed. The caller's aad is either one buffer used
 * for every item (aad_lens == NULL) or a contiguous buffer plus per-item
 * lengths.
 *
 * Batch functions return the number of failed items (>= 0) or a negative
 * KB_E* code when the call as a whole was rejected (nothing written).
 */
#ifndef KEYBROKER_KB_H
#define KEYBROKER_KB_H

#include <stddef.h>
#include <stdint.h>

enum {
    KB_OK = 0,
    KB_EARG = -1,     /* inconsistent lengths / sizes / null pointers */
    KB_ECLOSED = -2,  /* the slot has been closed */
    KB_ENOMEM = -3,   /* allocation or locked memory failure */
    KB_ECRYPTO = -4,  /* an OpenSSL call failed (RNG, context setup) */
    KB_EKIND = -5     /* slot kind does not allow this operation */
};

enum {
    KB_KIND_AES256GCM = 1,
    KB_KIND_HMAC_SHA256 = 2
};

enum {
    KB_ITEM_OK = 0,
    KB_ITEM_FAILED = 1
};

enum {
    KB_HEADER_LEN = 36,
    KB_NONCE_LEN = 12,
    KB_TAG_LEN = 16,
    KB_OVERHEAD = 52,
    KB_KEY_ID_LEN = 16,
    KB_MAC_LEN = 32,
    KB_HMAC_KEY_MIN = 16,
    KB_HMAC_KEY_MAX = 64
};

typedef struct kb_slot kb_slot;

/* Copies key_len bytes of key into locked memory. *out receives the slot. */
int kb_slot_new(int kind, const unsigned char *key, size_t key_len,
                const unsigned char *key_id, size_t key_id_len,
                uint32_t version, kb_slot **out);
/* Cleanses the key (at once, or when the last running call on it returns).
 * Idempotent. Later calls on the slot return KB_ECLOSED. */
void kb_slot_close(kb_slot *slot);
/* kb_slot_close() then frees the slot structure itself. */
void kb_slot_free(kb_slot *slot);
/* Number of items sealed with this slot (atomic). */
uint64_t kb_slot_uses(const kb_slot *slot);
/* 1 if the key bytes live in locked (non-swappable) memory. */
int kb_slot_locked(const kb_slot *slot);
int kb_slot_is_closed(const kb_slot *slot);

int64_t kb_seal_batch(kb_slot *slot, size_t n,
                      const unsigned char *in, size_t in_len, const uint64_t *lens,
                      const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens,
                      unsigned char *out, size_t out_len, unsigned char *status);

int64_t kb_open_batch(kb_slot *slot, size_t n,
                      const unsigned char *in, size_t in_len, const uint64_t *lens,
                      const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens,
                      unsigned char *out, size_t out_len, unsigned char *status);

int64_t kb_rewrap_batch(kb_slot *old_slot, kb_slot *new_slot, size_t n,
                        const unsigned char *in, size_t in_len, const uint64_t *lens,
                        const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens,
                        unsigned char *out, size_t out_len, unsigned char *status);

/* Single items (the batch functions with n = 1, fewer arguments to convert).
 * Return KB_OK, KB_ITEM_FAILED (1: the envelope did not open), or KB_E*. */
int kb_seal(kb_slot *slot, const unsigned char *pt, size_t pt_len, const unsigned char *aad, size_t aad_len,
            unsigned char *out, size_t out_len);
int kb_open(kb_slot *slot, const unsigned char *env, size_t env_len, const unsigned char *aad, size_t aad_len,
            unsigned char *out, size_t out_len);

/* Lends an AES slot's key for one large-payload call to a faster AES-GCM
 * engine: copies the key_len key bytes into out (the caller cleanses it as
 * soon as the call returns) and, when uses > 0, counts that many items
 * sealed. Returns KB_OK or KB_E*. */
int kb_slot_lend_key(kb_slot *slot, unsigned char *out, size_t out_len, uint64_t uses);

/* The header for sealing one large payload with an engine already keyed from
 * this slot: out (KB_HEADER_LEN bytes) receives the 36-byte envelope header
 * with a fresh nonce from OpenSSL's CSPRNG; counts one item sealed. No key
 * bytes leave the slot. Returns KB_OK or KB_E*. */
int kb_slot_seal_header(kb_slot *slot, unsigned char *out, size_t out_len);

/* 1 if AES-GCM contexts are driven through the provider's cipher functions
 * directly, 0 if through EVP (KEYBROKER_GCM_EVP=1, or the start-up
 * comparison of the two failed). */
int kb_gcm_direct(void);

/* HMAC-SHA256 of msg under an HMAC slot; writes KB_MAC_LEN bytes. */
int kb_hmac(kb_slot *slot, const unsigned char *msg, size_t msg_len,
            unsigned char *out, size_t out_len);
/* 1 if tag matches (constant time), 0 if not, negative KB_E* on error. */
int kb_hmac_verify(kb_slot *slot, const unsigned char *msg, size_t msg_len,
                   const unsigned char *tag, size_t tag_len);

/* fdatasync(fd) on one of a few native flushing threads kept for the
 * process, which then writes the outcome to the eventfd notify_fd: 1 for
 * success, 1 + errno for failure. The flush works on duplicates of both
 * descriptors, closed when it is done, so the caller may close its own at
 * any time. The threads never enter Python. Returns 0 once the flush is
 * queued, else an errno (nothing is written to notify_fd then). */
int kb_fdatasync_start(int fd, int notify_fd);

/* The layout of CPython's PyObjectArenaAllocator: how its small-object
 * allocator (pymalloc) gets and returns its arenas. */
typedef struct {
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} kb_arena_allocator;

/* An arena allocator that keeps freed arenas, up to keep_bytes of them, for
 * the next requests and otherwise passes through to *inner (copied): for
 * PyObject_SetArenaAllocator. Returns the one such allocator of the process;
 * once installed (a second call), *inner is ignored, so that it never wraps
 * itself. Its functions run only under the GIL, as pymalloc's own do. */
const kb_arena_allocator *kb_arena_cache(const kb_arena_allocator *inner, size_t keep_bytes);

#endif
