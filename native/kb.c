/*
 * keybroker native hot path. See kb.h for the contract.
 *
 * Rules kept throughout this file:
 *  - every length is validated before any copy, and offset arithmetic is
 *    checked against size_t overflow before it is done;
 *  - every OpenSSL return value is checked;
 *  - a slot's key bytes live only in locked memory (mlock'd, MADV_DONTDUMP
 *    pages) and are cleansed when the slot is released; the key schedules
 *    OpenSSL expands from them live in its cipher contexts on the ordinary
 *    heap while the slot keeps them (see kb_slot), and OpenSSL cleanses
 *    them when they are freed;
 *  - plaintext that passes through C in rewrap lives in a scratch buffer that
 *    is cleansed before it is freed; a failed open cleanses its output.
 */
#define _GNU_SOURCE
#include "kb.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <strings.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rand.h>

/* Largest length handed to one EVP call (their lengths are int). */
#define KB_EVP_CHUNK ((size_t)1 << 30)
/* Caller aad up to this size is merged with the header into one AAD update. */
#define KB_SMALL_AAD 220u
/* Plaintext scratch used by rewrap, per batch. */
#define KB_REWRAP_SCRATCH ((size_t)16384)

#define KB_CLOSED_BIT ((uint64_t)1 << 63)
/* Keyed contexts cached per slot and direction. */
#define KB_CTX_POOL 4
/* Batches of up to this many items take their nonces from the per-thread cache. */
#define KB_NONCE_CACHE_ITEMS 256u
#define KB_SMALL_BATCH 64u

enum { KB_WHERE_NONE = 0, KB_WHERE_SECURE_HEAP = 1, KB_WHERE_POOL = 2 };

struct kb_slot {
    _Atomic uint64_t state; /* KB_CLOSED_BIT | number of references (owner + running calls) */
    _Atomic uint64_t uses;
    unsigned char *key;     /* key_len bytes in locked memory */
    size_t key_len;
    int kind;
    int where;
    int locked;
    uint32_t version;
    unsigned char key_id[KB_KEY_ID_LEN];
    /* Keyed GCM contexts (see gctx_new) kept between calls ([0] decrypt,
     * [1] encrypt), so a call does not pay for context setup and key
     * expansion. A call borrows one exclusively; they are freed (OpenSSL
     * cleanses them) with the key. They hold the expanded key schedule,
     * from which the key can be recovered, in OpenSSL's heap: not locked,
     * so swappable (docs/sidecar.md). */
    pthread_mutex_t ctx_lock;
    void *ctx_pool[2][KB_CTX_POOL];
    int ctx_count[2];
};

/* ------------------------------------------------------------------------ */
/* Locked key memory: a pool of mlock'd, MADV_DONTDUMP pages cut into cells. */

#define KB_CELL 64u
#define KB_ARENA_BYTES 4096u
#define KB_ARENA_CELLS (KB_ARENA_BYTES / KB_CELL) /* 64: one bit each in `used` */

struct kb_arena {
    struct kb_arena *next;
    unsigned char *mem;
    size_t map_len;
    uint64_t used;
    int locked;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct kb_arena *pool_head = NULL;

static struct kb_arena *arena_new(void)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t map_len = KB_ARENA_BYTES;
    if (page > 0 && (size_t)page > map_len)
        map_len = (size_t)page;
    struct kb_arena *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    void *mem = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        free(a);
        return NULL;
    }
#ifdef MADV_DONTDUMP
    (void)madvise(mem, map_len, MADV_DONTDUMP); /* best effort: keep keys out of core dumps */
#endif
    a->mem = mem;
    a->map_len = map_len;
    a->locked = mlock(mem, map_len) == 0; /* may fail under RLIMIT_MEMLOCK; reported per slot */
    a->used = 0;
    return a;
}

static unsigned char *pool_alloc(int *locked)
{
    unsigned char *p = NULL;
    if (pthread_mutex_lock(&pool_lock) != 0)
        return NULL;
    struct kb_arena *a = pool_head;
    while (a != NULL && a->used == UINT64_MAX)
        a = a->next;
    if (a == NULL) {
        a = arena_new();
        if (a != NULL) {
            a->next = pool_head;
            pool_head = a;
        }
    }
    if (a != NULL) {
        unsigned bit = (unsigned)__builtin_ctzll(~a->used);
        a->used |= (uint64_t)1 << bit;
        p = a->mem + (size_t)bit * KB_CELL;
        *locked = a->locked;
    }
    (void)pthread_mutex_unlock(&pool_lock);
    return p;
}

static void pool_free(unsigned char *p)
{
    OPENSSL_cleanse(p, KB_CELL);
    if (pthread_mutex_lock(&pool_lock) != 0)
        return; /* cannot happen with a default mutex; the cell stays cleansed */
    struct kb_arena **link = &pool_head;
    while (*link != NULL) {
        struct kb_arena *a = *link;
        if (p >= a->mem && p < a->mem + KB_ARENA_BYTES) {
            size_t bit = (size_t)(p - a->mem) / KB_CELL;
            a->used &= ~((uint64_t)1 << bit);
            if (a->used == 0) {
                *link = a->next;
                OPENSSL_cleanse(a->mem, a->map_len);
                if (a->locked)
                    (void)munlock(a->mem, a->map_len);
                (void)munmap(a->mem, a->map_len);
                free(a);
            }
            break;
        }
        link = &a->next;
    }
    (void)pthread_mutex_unlock(&pool_lock);
}

/* A call that failed may have left entries in this thread's OpenSSL error
 * queue: drop them, so that a later, unrelated failure on this thread (the
 * cryptography package reads the same queue) is not reported with them. */
static void drop_errors_if(int failed)
{
    if (failed)
        ERR_clear_error();
}

/* ------------------------------------------------------------------------ */
/* Algorithms, fetched once, and the GCM engine.
 *
 * AES-256-GCM is always OpenSSL's implementation, the one EVP_CIPHER_fetch
 * picks. On OpenSSL 3.0 the EVP layer costs more than the cipher itself for
 * small messages: every EVP_CipherInit_ex that sets an IV first asks the
 * provider for the IV length through a parameter query, and every call goes
 * through EVP's dispatch and checks (measured here for a 32-byte seal: 160 ns
 * through EVP, 115 ns without that layer). So when the provider that
 * implements the fetched cipher hands out its cipher functions
 * (OSSL_PROVIDER_query_operation, provider-cipher(7)), contexts are created
 * and driven through those same functions: the code EVP would run, with the
 * same checks inside the provider (IV state, tag verification), minus EVP's
 * own bookkeeping. The provider stays loaded because g_gcm holds a reference
 * to it. At start-up a known-answer comparison against the EVP path must
 * pass, or the EVP path is used for the life of the process.
 */

static pthread_once_t algs_once = PTHREAD_ONCE_INIT;
static EVP_CIPHER *g_gcm = NULL;
static EVP_MD *g_sha256 = NULL;

static struct {
    OSSL_FUNC_cipher_newctx_fn *newctx;
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_encrypt_init_fn *einit;
    OSSL_FUNC_cipher_decrypt_init_fn *dinit;
    OSSL_FUNC_cipher_update_fn *update;
    OSSL_FUNC_cipher_final_fn *final;
    OSSL_FUNC_cipher_get_ctx_params_fn *get_ctx_params;
    void *provctx;
} g_prov;
/* 1: contexts are provider contexts driven through g_prov; 0: EVP_CIPHER_CTX.
 * Set once inside algs_init, before any context exists. */
static int g_direct = 0;

/* A context keyed for direction enc (1 encrypt, 0 decrypt) with the 32-byte key. */
static void *gctx_new(const unsigned char *key, size_t key_len, int enc)
{
    if (g_direct) {
        void *alg = g_prov.newctx(g_prov.provctx);
        if (alg == NULL)
            return NULL;
        int ok = enc ? g_prov.einit(alg, key, key_len, NULL, 0, NULL) : g_prov.dinit(alg, key, key_len, NULL, 0, NULL);
        if (ok != 1) {
            g_prov.freectx(alg);
            return NULL;
        }
        return alg;
    }
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (key_len != 32 || EVP_CipherInit_ex(ctx, g_gcm, NULL, key, NULL, enc) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, KB_NONCE_LEN, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* Frees a context; OpenSSL cleanses the key schedule it holds. */
static void gctx_free(void *ctx)
{
    if (ctx == NULL)
        return;
    if (g_direct)
        g_prov.freectx(ctx);
    else
        EVP_CIPHER_CTX_free(ctx);
}

/* Starts a message: the nonce, and when decrypting the tag it must verify against. */
static int gctx_start(void *ctx, int enc, const unsigned char *nonce, const unsigned char *tag)
{
    if (g_direct) {
        if (enc)
            return g_prov.einit(ctx, NULL, 0, nonce, KB_NONCE_LEN, NULL) == 1;
        OSSL_PARAM params[2] = {
            {OSSL_CIPHER_PARAM_AEAD_TAG, OSSL_PARAM_OCTET_STRING, (void *)tag, KB_TAG_LEN, OSSL_PARAM_UNMODIFIED},
            OSSL_PARAM_END,
        };
        return g_prov.dinit(ctx, NULL, 0, nonce, KB_NONCE_LEN, params) == 1;
    }
    return EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) == 1 &&
           (enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, KB_TAG_LEN, (void *)tag) == 1);
}

/* Feeds len bytes: additional data when out is NULL, else en/decrypts in into out. */
static int gctx_update(void *ctx, unsigned char *out, const unsigned char *in, size_t len)
{
    size_t off = 0;
    while (off < len) {
        size_t chunk = len - off;
        if (chunk > KB_EVP_CHUNK)
            chunk = KB_EVP_CHUNK;
        unsigned char *dst = out != NULL ? out + off : NULL;
        size_t done = 0;
        if (g_direct) {
            if (g_prov.update(ctx, dst, &done, chunk, in + off, chunk) != 1)
                return 0;
        } else {
            int outl = 0;
            if (EVP_CipherUpdate(ctx, dst, &outl, in + off, (int)chunk) != 1 || outl < 0)
                return 0;
            done = (size_t)outl;
        }
        if (out != NULL && done != chunk)
            return 0;
        off += chunk;
    }
    return 1;
}

/* Ends the message; when decrypting, 1 only if the tag verified. */
static int gctx_finish(void *ctx)
{
    unsigned char sink[32];
    if (g_direct) {
        size_t outl = 0;
        /* GCM's final emits no bytes; anything else is an error. */
        return g_prov.final(ctx, sink, &outl, sizeof(sink)) == 1 && outl == 0;
    }
    int outl = 0;
    return EVP_CipherFinal_ex(ctx, sink, &outl) == 1 && outl == 0;
}

/* The tag of the message just finished (encryption). */
static int gctx_tag(void *ctx, unsigned char *tag)
{
    if (g_direct) {
        OSSL_PARAM params[2] = {
            {OSSL_CIPHER_PARAM_AEAD_TAG, OSSL_PARAM_OCTET_STRING, tag, KB_TAG_LEN, OSSL_PARAM_UNMODIFIED},
            OSSL_PARAM_END,
        };
        return g_prov.get_ctx_params(ctx, params) == 1 && params[0].return_size == KB_TAG_LEN;
    }
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, KB_TAG_LEN, tag) == 1;
}

/* One whole message with a fresh context of the current engine (start-up self-test only). */
static int gcm_oneshot(int enc, const unsigned char *key, const unsigned char *nonce, const unsigned char *aad,
                       size_t aad_len, const unsigned char *in, size_t len, unsigned char *out, unsigned char *tag)
{
    void *ctx = gctx_new(key, 32, enc);
    int ok = ctx != NULL && gctx_start(ctx, enc, nonce, tag) && gctx_update(ctx, NULL, aad, aad_len) &&
             gctx_update(ctx, out, in, len) && gctx_finish(ctx) && (!enc || gctx_tag(ctx, tag));
    gctx_free(ctx);
    return ok;
}

/*
 * The direct path is used only if it seals a test message to exactly the
 * bytes the EVP path gives, opens that envelope, and rejects it with one tag
 * bit flipped. Runs inside algs_init, before any other thread can see g_direct.
 */
static int direct_self_test(void)
{
    unsigned char key[32], nonce[KB_NONCE_LEN], aad[41], pt[67];
    unsigned char ct_evp[sizeof(pt)], tag_evp[KB_TAG_LEN], ct[sizeof(pt)], tag[KB_TAG_LEN], back[sizeof(pt)];
    for (size_t i = 0; i < sizeof(key); i++)
        key[i] = (unsigned char)(0xA5 ^ (i * 7));
    for (size_t i = 0; i < sizeof(nonce); i++)
        nonce[i] = (unsigned char)(i * 13 + 1);
    for (size_t i = 0; i < sizeof(aad); i++)
        aad[i] = (unsigned char)(i * 3 + 5);
    for (size_t i = 0; i < sizeof(pt); i++)
        pt[i] = (unsigned char)(i * 11 + 7);

    g_direct = 0;
    if (!gcm_oneshot(1, key, nonce, aad, sizeof(aad), pt, sizeof(pt), ct_evp, tag_evp))
        return 0;
    g_direct = 1;
    int ok = gcm_oneshot(1, key, nonce, aad, sizeof(aad), pt, sizeof(pt), ct, tag) &&
             memcmp(ct, ct_evp, sizeof(ct)) == 0 && memcmp(tag, tag_evp, sizeof(tag)) == 0 &&
             gcm_oneshot(0, key, nonce, aad, sizeof(aad), ct, sizeof(ct), back, tag) &&
             memcmp(back, pt, sizeof(pt)) == 0;
    if (ok) {
        tag[KB_TAG_LEN - 1] ^= 1;
        ok = !gcm_oneshot(0, key, nonce, aad, sizeof(aad), ct, sizeof(ct), back, tag);
    }
    g_direct = 0;
    OPENSSL_cleanse(back, sizeof(back));
    return ok;
}

/* 1 if ':'-separated `names` contains `name` (case-insensitive, as OpenSSL compares names). */
static int names_include(const char *names, const char *name)
{
    size_t want = strlen(name);
    const char *p = names;
    while (*p != '\0') {
        const char *end = strchr(p, ':');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len == want && strncasecmp(p, name, len) == 0)
            return 1;
        if (end == NULL)
            break;
        p = end + 1;
    }
    return 0;
}

/* Looks up the cipher functions of g_gcm's provider; 1 if all were found. */
static int find_direct_gcm(void)
{
    const OSSL_PROVIDER *prov = EVP_CIPHER_get0_provider(g_gcm);
    if (prov == NULL)
        return 0;
    int no_store = 0;
    const OSSL_ALGORITHM *algs = OSSL_PROVIDER_query_operation(prov, OSSL_OP_CIPHER, &no_store);
    if (algs == NULL)
        return 0;
    const OSSL_DISPATCH *impl = NULL;
    int matches = 0;
    for (const OSSL_ALGORITHM *a = algs; a->algorithm_names != NULL; a++) {
        if (names_include(a->algorithm_names, "AES-256-GCM")) {
            impl = a->implementation;
            matches++;
        }
    }
    int found = 0;
    if (matches == 1 && impl != NULL) { /* more than one: cannot tell which one EVP fetched */
        memset(&g_prov, 0, sizeof(g_prov));
        for (const OSSL_DISPATCH *f = impl; f->function_id != 0; f++) {
            switch (f->function_id) {
            case OSSL_FUNC_CIPHER_NEWCTX:
                g_prov.newctx = OSSL_FUNC_cipher_newctx(f);
                break;
            case OSSL_FUNC_CIPHER_FREECTX:
                g_prov.freectx = OSSL_FUNC_cipher_freectx(f);
                break;
            case OSSL_FUNC_CIPHER_ENCRYPT_INIT:
                g_prov.einit = OSSL_FUNC_cipher_encrypt_init(f);
                break;
            case OSSL_FUNC_CIPHER_DECRYPT_INIT:
                g_prov.dinit = OSSL_FUNC_cipher_decrypt_init(f);
                break;
            case OSSL_FUNC_CIPHER_UPDATE:
                g_prov.update = OSSL_FUNC_cipher_update(f);
                break;
            case OSSL_FUNC_CIPHER_FINAL:
                g_prov.final = OSSL_FUNC_cipher_final(f);
                break;
            case OSSL_FUNC_CIPHER_GET_CTX_PARAMS:
                g_prov.get_ctx_params = OSSL_FUNC_cipher_get_ctx_params(f);
                break;
            default:
                break;
            }
        }
        g_prov.provctx = OSSL_PROVIDER_get0_provider_ctx(prov);
        found = g_prov.newctx != NULL && g_prov.freectx != NULL && g_prov.einit != NULL && g_prov.dinit != NULL &&
                g_prov.update != NULL && g_prov.final != NULL && g_prov.get_ctx_params != NULL;
    }
    OSSL_PROVIDER_unquery_operation(prov, OSSL_OP_CIPHER, algs);
    return found;
}

static void algs_init(void)
{
    g_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    g_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    const char *force_evp = getenv("KEYBROKER_GCM_EVP"); /* for tests and measurements */
    if (g_gcm != NULL && (force_evp == NULL || force_evp[0] == '\0' || strcmp(force_evp, "0") == 0))
        g_direct = find_direct_gcm() && direct_self_test();
}

/* 1 once the AES-256-GCM engine is usable. */
static int gcm_ready(void)
{
    return pthread_once(&algs_once, algs_init) == 0 && g_gcm != NULL;
}

static const EVP_MD *sha256_md(void)
{
    if (pthread_once(&algs_once, algs_init) != 0)
        return NULL;
    return g_sha256;
}

int kb_gcm_direct(void)
{
    return gcm_ready() && g_direct;
}

/* ------------------------------------------------------------------------ */
/* Slots. */

static void slot_destroy_key(kb_slot *s)
{
    if (s->key == NULL)
        return;
    if (pthread_mutex_lock(&s->ctx_lock) == 0) {
        for (int d = 0; d < 2; d++) {
            for (int i = 0; i < s->ctx_count[d]; i++) {
                gctx_free(s->ctx_pool[d][i]); /* cleanses the key schedule */
                s->ctx_pool[d][i] = NULL;
            }
            s->ctx_count[d] = 0;
        }
        (void)pthread_mutex_unlock(&s->ctx_lock);
    }
    if (s->where == KB_WHERE_SECURE_HEAP)
        OPENSSL_secure_clear_free(s->key, s->key_len);
    else if (s->where == KB_WHERE_POOL)
        pool_free(s->key);
    s->key = NULL;
    s->where = KB_WHERE_NONE;
}

static int slot_acquire(kb_slot *s)
{
    uint64_t v = atomic_load_explicit(&s->state, memory_order_acquire);
    do {
        if ((v & KB_CLOSED_BIT) != 0)
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(&s->state, &v, v + 1, memory_order_acq_rel,
                                                    memory_order_acquire));
    return 1;
}

static void slot_release(kb_slot *s)
{
    uint64_t prev = atomic_fetch_sub_explicit(&s->state, 1, memory_order_acq_rel);
    if ((prev & KB_CLOSED_BIT) != 0 && (prev & ~KB_CLOSED_BIT) == 1)
        slot_destroy_key(s); /* last reference of a closed slot */
}

int kb_slot_new(int kind, const unsigned char *key, size_t key_len, const unsigned char *key_id,
                size_t key_id_len, uint32_t version, kb_slot **out)
{
    if (out == NULL)
        return KB_EARG;
    *out = NULL;
    if (key == NULL || key_id == NULL || key_id_len != KB_KEY_ID_LEN)
        return KB_EARG;
    if (kind == KB_KIND_AES256GCM) {
        if (key_len != 32)
            return KB_EARG;
    } else if (kind == KB_KIND_HMAC_SHA256) {
        if (key_len < KB_HMAC_KEY_MIN || key_len > KB_HMAC_KEY_MAX)
            return KB_EARG;
    } else {
        return KB_EKIND;
    }
    if (key_len > KB_CELL)
        return KB_EARG;

    kb_slot *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return KB_ENOMEM;
    if (pthread_mutex_init(&s->ctx_lock, NULL) != 0) {
        free(s);
        return KB_ENOMEM;
    }
    if (CRYPTO_secure_malloc_initialized()) {
        s->key = OPENSSL_secure_malloc(key_len);
        if (s->key != NULL) {
            s->where = KB_WHERE_SECURE_HEAP;
            s->locked = 1;
        }
    }
    if (s->key == NULL) {
        s->key = pool_alloc(&s->locked);
        if (s->key == NULL) {
            (void)pthread_mutex_destroy(&s->ctx_lock);
            free(s);
            return KB_ENOMEM;
        }
        s->where = KB_WHERE_POOL;
    }
    memcpy(s->key, key, key_len);
    s->key_len = key_len;
    s->kind = kind;
    s->version = version;
    memcpy(s->key_id, key_id, KB_KEY_ID_LEN);
    atomic_init(&s->uses, 0);
    atomic_init(&s->state, 1); /* the owner's reference */
    *out = s;
    return KB_OK;
}

void kb_slot_close(kb_slot *slot)
{
    if (slot == NULL)
        return;
    uint64_t prev = atomic_fetch_or_explicit(&slot->state, KB_CLOSED_BIT, memory_order_acq_rel);
    if ((prev & KB_CLOSED_BIT) != 0)
        return; /* already closed */
    slot_release(slot); /* drop the owner's reference */
}

void kb_slot_free(kb_slot *slot)
{
    /* Precondition: no call on this slot is running (the Python wrapper holds
     * the handle for the duration of every call, so its finaliser cannot run
     * concurrently with one). */
    if (slot == NULL)
        return;
    kb_slot_close(slot);
    slot_destroy_key(slot); /* no-op unless a reference was leaked */
    (void)pthread_mutex_destroy(&slot->ctx_lock);
    OPENSSL_cleanse(slot, sizeof(*slot));
    free(slot);
}

uint64_t kb_slot_uses(const kb_slot *slot)
{
    if (slot == NULL)
        return 0;
    return atomic_load_explicit(&((kb_slot *)slot)->uses, memory_order_relaxed);
}

int kb_slot_lend_key(kb_slot *slot, unsigned char *out, size_t out_len, uint64_t uses)
{
    if (slot == NULL || out == NULL)
        return KB_EARG;
    if (!slot_acquire(slot))
        return KB_ECLOSED;
    int rc = KB_OK;
    if (slot->kind != KB_KIND_AES256GCM)
        rc = KB_EKIND;
    else if (out_len != slot->key_len)
        rc = KB_EARG;
    else {
        memcpy(out, slot->key, slot->key_len);
        atomic_fetch_add_explicit(&slot->uses, uses, memory_order_relaxed);
    }
    slot_release(slot);
    return rc;
}

int kb_slot_locked(const kb_slot *slot)
{
    return slot != NULL && slot->locked;
}

int kb_slot_is_closed(const kb_slot *slot)
{
    if (slot == NULL)
        return 1;
    return (atomic_load_explicit(&((kb_slot *)slot)->state, memory_order_acquire) & KB_CLOSED_BIT) != 0;
}

/* ------------------------------------------------------------------------ */
/* Batch bookkeeping. */

typedef struct {
    size_t n;
    const unsigned char *in;
    size_t in_len;
    const uint64_t *lens; /* NULL: uniform */
    size_t uniform;
    const unsigned char *aad;
    size_t aad_len;
    const uint64_t *aad_lens; /* NULL: the whole aad for every item */
    /* cursors */
    size_t in_off;
    size_t aad_off;
} kb_batch;

/* Validates that `lens` (n entries) sums to exactly `total` without overflow. */
static int lens_sum_ok(const uint64_t *lens, size_t n, size_t total)
{
    size_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] > (uint64_t)(total - acc))
            return 0;
        acc += (size_t)lens[i];
    }
    return acc == total;
}

static int batch_init(kb_batch *b, size_t n, const unsigned char *in, size_t in_len, const uint64_t *lens,
                      const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens)
{
    memset(b, 0, sizeof(*b));
    b->n = n;
    b->in = in;
    b->in_len = in_len;
    b->lens = lens;
    b->aad = aad;
    b->aad_len = aad_len;
    b->aad_lens = aad_lens;
    if (in == NULL && in_len != 0)
        return 0;
    if (aad == NULL && aad_len != 0)
        return 0;
    if (n == 0)
        return in_len == 0 && (aad_lens == NULL || aad_len == 0);
    if (lens == NULL) {
        if (in_len % n != 0)
            return 0;
        b->uniform = in_len / n;
    } else if (!lens_sum_ok(lens, n, in_len)) {
        return 0;
    }
    if (aad_lens != NULL && !lens_sum_ok(aad_lens, n, aad_len))
        return 0;
    return 1;
}

/*
 * Next item: its input and aad. batch_init validated the lengths; they are
 * bounds-checked again here so that a length array changed between the two
 * reads can never move a cursor past its buffer. Returns 0 if out of bounds.
 */
static int batch_next(kb_batch *b, size_t i, const unsigned char **item, size_t *item_len,
                      const unsigned char **aad, size_t *aad_len)
{
    uint64_t len = b->lens != NULL ? b->lens[i] : (uint64_t)b->uniform;
    if (len > (uint64_t)(b->in_len - b->in_off))
        return 0;
    *item = b->in + b->in_off;
    *item_len = (size_t)len;
    b->in_off += (size_t)len;
    if (b->aad_lens != NULL) {
        uint64_t alen = b->aad_lens[i];
        if (alen > (uint64_t)(b->aad_len - b->aad_off))
            return 0;
        *aad = b->aad + b->aad_off;
        *aad_len = (size_t)alen;
        b->aad_off += (size_t)alen;
    } else {
        *aad = b->aad;
        *aad_len = b->aad_len;
    }
    return 1;
}

/* Marks items i..n-1 failed and zeroes the rest of the output (the batch's
 * layout can no longer be trusted). */
static int64_t fail_rest(unsigned char *status, size_t i, size_t n, unsigned char *out, size_t out_off,
                         size_t out_len)
{
    memset(status + i, KB_ITEM_FAILED, n - i);
    if (out != NULL && out_off < out_len)
        OPENSSL_cleanse(out + out_off, out_len - out_off);
    return (int64_t)(n - i);
}

static size_t open_out_len(size_t env_len)
{
    return env_len >= KB_OVERHEAD ? env_len - KB_OVERHEAD : 0;
}

/* Fills buf with len random bytes: one RAND_bytes call (chunked only past INT_MAX). */
static int random_bytes(unsigned char *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        size_t chunk = len - off;
        if (chunk > (size_t)INT_MAX)
            chunk = (size_t)INT_MAX - ((size_t)INT_MAX % KB_NONCE_LEN);
        if (RAND_bytes(buf + off, (int)chunk) != 1)
            return 0;
        off += chunk;
    }
    return 1;
}

/*
 * Nonces for small batches come from a per-thread cache filled by one
 * RAND_bytes call per KB_NONCE_CACHE_ITEMS nonces: a RAND_bytes call costs
 * more than sealing a small item. Every cached nonce is handed out at most
 * once (`avail` only shrinks until the next refill). A fork bumps
 * fork_generation in the child, which makes the child discard the copy of
 * the parent's cache it inherited, so parent and child never share a nonce.
 */
static _Atomic uint64_t fork_generation = 0;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_ok = 0;

static void on_fork_child(void)
{
    atomic_fetch_add_explicit(&fork_generation, 1, memory_order_relaxed);
}

static void atfork_init(void)
{
    atfork_ok = pthread_atfork(NULL, NULL, on_fork_child) == 0;
}

static _Thread_local struct {
    unsigned char buf[KB_NONCE_CACHE_ITEMS * KB_NONCE_LEN];
    size_t avail; /* unused nonces at the end of buf */
    uint64_t generation;
} tl_nonces;

static int cached_nonces(unsigned char *dst, size_t n)
{
    if (pthread_once(&atfork_once, atfork_init) != 0 || !atfork_ok)
        return random_bytes(dst, n * KB_NONCE_LEN); /* no fork protection: no cache */
    uint64_t gen = atomic_load_explicit(&fork_generation, memory_order_relaxed);
    if (tl_nonces.generation != gen) {
        tl_nonces.avail = 0;
        tl_nonces.generation = gen;
    }
    if (tl_nonces.avail < n) {
        if (!random_bytes(tl_nonces.buf, sizeof(tl_nonces.buf)))
            return 0;
        tl_nonces.avail = KB_NONCE_CACHE_ITEMS;
    }
    size_t start = (KB_NONCE_CACHE_ITEMS - tl_nonces.avail) * KB_NONCE_LEN;
    memcpy(dst, tl_nonces.buf + start, n * KB_NONCE_LEN);
    OPENSSL_cleanse(tl_nonces.buf + start, n * KB_NONCE_LEN);
    tl_nonces.avail -= n;
    return 1;
}

/*
 * Nonces for an n-item batch: small batches use `small` (KB_SMALL_BATCH
 * nonces) filled from the per-thread cache; larger ones get a heap buffer
 * filled by ONE RAND_bytes call. Returns NULL on failure; free with
 * release_nonces().
 */
static unsigned char *draw_nonces(size_t n, unsigned char *small)
{
    if (n <= KB_SMALL_BATCH)
        return cached_nonces(small, n) ? small : NULL;
    if (n > SIZE_MAX / KB_NONCE_LEN)
        return NULL;
    unsigned char *buf = malloc(n * KB_NONCE_LEN);
    if (buf == NULL)
        return NULL;
    if (!random_bytes(buf, n * KB_NONCE_LEN)) {
        free(buf);
        return NULL;
    }
    return buf;
}

static void release_nonces(unsigned char *nonces, const unsigned char *small)
{
    if (nonces != small)
        free(nonces);
}

/* ------------------------------------------------------------------------ */
/* Per-item GCM steps. `ctx` already holds the key; only the nonce changes. */

static void put_header(unsigned char *h, const kb_slot *s, const unsigned char *nonce)
{
    h[0] = 'K';
    h[1] = 'B';
    h[2] = 1; /* format */
    h[3] = 1; /* AES-256-GCM */
    memcpy(h + 4, s->key_id, KB_KEY_ID_LEN);
    h[20] = (unsigned char)(s->version >> 24);
    h[21] = (unsigned char)(s->version >> 16);
    h[22] = (unsigned char)(s->version >> 8);
    h[23] = (unsigned char)(s->version);
    memcpy(h + 24, nonce, KB_NONCE_LEN);
}

/* 1 if the envelope header names format 1 / AES-256-GCM / this slot's key and version. */
static int header_matches(const unsigned char *h, const kb_slot *s)
{
    uint32_t version = ((uint32_t)h[20] << 24) | ((uint32_t)h[21] << 16) | ((uint32_t)h[22] << 8) |
                       (uint32_t)h[23];
    return h[0] == 'K' && h[1] == 'B' && h[2] == 1 && h[3] == 1 &&
           memcmp(h + 4, s->key_id, KB_KEY_ID_LEN) == 0 && version == s->version;
}

/* AAD = header || caller aad, in one update when the caller's aad is small. */
static int feed_aad(void *ctx, const unsigned char *header, const unsigned char *aad, size_t aad_len)
{
    if (aad_len == 0)
        return gctx_update(ctx, NULL, header, KB_HEADER_LEN);
    if (aad_len <= KB_SMALL_AAD) {
        unsigned char buf[KB_HEADER_LEN + KB_SMALL_AAD];
        memcpy(buf, header, KB_HEADER_LEN);
        memcpy(buf + KB_HEADER_LEN, aad, aad_len);
        return gctx_update(ctx, NULL, buf, KB_HEADER_LEN + aad_len);
    }
    return gctx_update(ctx, NULL, header, KB_HEADER_LEN) && gctx_update(ctx, NULL, aad, aad_len);
}

/* Writes the envelope for pt into out (pt_len + KB_OVERHEAD bytes). */
static int seal_one(void *ctx, const kb_slot *s, const unsigned char *nonce, const unsigned char *pt, size_t pt_len,
                    const unsigned char *aad, size_t aad_len, unsigned char *out)
{
    put_header(out, s, nonce);
    return gctx_start(ctx, 1, nonce, NULL) && feed_aad(ctx, out, aad, aad_len) &&
           gctx_update(ctx, out + KB_HEADER_LEN, pt, pt_len) && gctx_finish(ctx) &&
           gctx_tag(ctx, out + KB_HEADER_LEN + pt_len);
}

/* Opens env (env_len >= KB_OVERHEAD, checked by the caller) into out. */
static int open_one(void *ctx, const kb_slot *s, const unsigned char *env, size_t env_len, const unsigned char *aad,
                    size_t aad_len, unsigned char *out)
{
    size_t ct_len = env_len - KB_OVERHEAD;
    unsigned char tag[KB_TAG_LEN];
    if (!header_matches(env, s))
        return 0;
    memcpy(tag, env + KB_HEADER_LEN + ct_len, KB_TAG_LEN);
    return gctx_start(ctx, 0, env + 24, tag) && feed_aad(ctx, env, aad, aad_len) &&
           gctx_update(ctx, out, env + KB_HEADER_LEN, ct_len) && gctx_finish(ctx);
}

/* A keyed context for direction enc (1 encrypt, 0 decrypt), from the slot's pool or new. */
static void *ctx_borrow(kb_slot *s, int enc)
{
    void *ctx = NULL;
    if (pthread_mutex_lock(&s->ctx_lock) == 0) {
        if (s->ctx_count[enc] > 0)
            ctx = s->ctx_pool[enc][--s->ctx_count[enc]];
        (void)pthread_mutex_unlock(&s->ctx_lock);
    }
    if (ctx == NULL && gcm_ready())
        ctx = gctx_new(s->key, s->key_len, enc);
    return ctx;
}

/* Gives ctx back to the pool; `clean` is 0 if any item failed, then it is freed instead. */
static void ctx_return(kb_slot *s, int enc, void *ctx, int clean)
{
    if (ctx == NULL)
        return;
    if (clean && pthread_mutex_lock(&s->ctx_lock) == 0) {
        int kept = 0;
        if (s->key != NULL && s->ctx_count[enc] < KB_CTX_POOL) {
            s->ctx_pool[enc][s->ctx_count[enc]++] = ctx;
            kept = 1;
        }
        (void)pthread_mutex_unlock(&s->ctx_lock);
        if (kept)
            return;
    }
    gctx_free(ctx);
}

static int slot_is_aes(const kb_slot *s)
{
    return s->kind == KB_KIND_AES256GCM;
}

/* ------------------------------------------------------------------------ */
/* Batches. */

int64_t kb_seal_batch(kb_slot *slot, size_t n, const unsigned char *in, size_t in_len, const uint64_t *lens,
                      const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens, unsigned char *out,
                      size_t out_len, unsigned char *status)
{
    kb_batch b;
    if (slot == NULL || !batch_init(&b, n, in, in_len, lens, aad, aad_len, aad_lens))
        return KB_EARG;
    if (n > (SIZE_MAX - in_len) / KB_OVERHEAD || out_len != in_len + n * KB_OVERHEAD)
        return KB_EARG;
    if (n > (size_t)INT64_MAX || (n > 0 && (out == NULL || status == NULL)))
        return KB_EARG;
    if (!slot_is_aes(slot))
        return KB_EKIND;
    if (n == 0)
        return 0;
    if (!slot_acquire(slot))
        return KB_ECLOSED;

    int64_t rc = 0;
    unsigned char small[KB_SMALL_BATCH * KB_NONCE_LEN];
    unsigned char *nonces = draw_nonces(n, small);
    void *ctx = nonces != NULL ? ctx_borrow(slot, 1) : NULL;
    if (nonces == NULL || ctx == NULL) {
        rc = nonces == NULL ? KB_ECRYPTO : KB_ENOMEM;
        goto done;
    }
    /* Count before sealing: every drawn nonce counts against the version's bound. */
    atomic_fetch_add_explicit(&slot->uses, (uint64_t)n, memory_order_relaxed);

    size_t out_off = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *pt, *item_aad;
        size_t pt_len, item_aad_len;
        if (!batch_next(&b, i, &pt, &pt_len, &item_aad, &item_aad_len) ||
            KB_OVERHEAD > out_len - out_off || pt_len > out_len - out_off - KB_OVERHEAD) {
            rc += fail_rest(status, i, n, out, out_off, out_len);
            break;
        }
        size_t env_len = pt_len + KB_OVERHEAD;
        unsigned char *env = out + out_off;
        if (seal_one(ctx, slot, nonces + i * KB_NONCE_LEN, pt, pt_len, item_aad, item_aad_len, env)) {
            status[i] = KB_ITEM_OK;
        } else {
            OPENSSL_cleanse(env, env_len);
            status[i] = KB_ITEM_FAILED;
            rc++;
        }
        out_off += env_len;
    }

done:
    ctx_return(slot, 1, ctx, rc == 0);
    if (nonces != NULL)
        release_nonces(nonces, small);
    slot_release(slot);
    drop_errors_if(rc != 0);
    return rc;
}

int64_t kb_open_batch(kb_slot *slot, size_t n, const unsigned char *in, size_t in_len, const uint64_t *lens,
                      const unsigned char *aad, size_t aad_len, const uint64_t *aad_lens, unsigned char *out,
                      size_t out_len, unsigned char *status)
{
    kb_batch b;
    if (slot == NULL || !batch_init(&b, n, in, in_len, lens, aad, aad_len, aad_lens))
        return KB_EARG;
    if (n > (size_t)INT64_MAX || (n > 0 && status == NULL))
        return KB_EARG;
    /* The plaintexts total at most in_len, so this sum cannot overflow. */
    size_t need = 0;
    if (lens == NULL)
        need = n * open_out_len(b.uniform);
    else
        for (size_t i = 0; i < n; i++)
            need += open_out_len((size_t)lens[i]);
    if (out_len != need || (need > 0 && out == NULL))
        return KB_EARG;
    if (!slot_is_aes(slot))
        return KB_EKIND;
    if (n == 0)
        return 0;
    if (!slot_acquire(slot))
        return KB_ECLOSED;

    int64_t rc = 0;
    void *ctx = ctx_borrow(slot, 0);
    if (ctx == NULL) {
        rc = KB_ENOMEM;
        goto done;
    }
    size_t out_off = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *env, *item_aad;
        size_t env_len, item_aad_len;
        if (!batch_next(&b, i, &env, &env_len, &item_aad, &item_aad_len) ||
            open_out_len(env_len) > out_len - out_off) {
            rc += fail_rest(status, i, n, out, out_off, out_len);
            break;
        }
        size_t pt_len = open_out_len(env_len);
        unsigned char *pt = out + out_off;
        if (env_len >= KB_OVERHEAD && open_one(ctx, slot, env, env_len, item_aad, item_aad_len, pt)) {
            status[i] = KB_ITEM_OK;
        } else {
            if (pt_len > 0)
                OPENSSL_cleanse(pt, pt_len); /* never hand out unauthenticated plaintext */
            status[i] = KB_ITEM_FAILED;
            rc++;
        }
        out_off += pt_len;
    }

done:
    ctx_return(slot, 0, ctx, rc == 0);
    slot_release(slot);
    drop_errors_if(rc != 0);
    return rc;
}

/* Re-encrypts env under new_slot into out (same length), plaintext only in scratch. */
static int rewrap_one(void *dctx, void *ectx, const kb_slot *old_slot, const kb_slot *new_slot,
                      const unsigned char *nonce, const unsigned char *env, size_t env_len, const unsigned char *aad,
                      size_t aad_len, unsigned char *out, unsigned char *scratch)
{
    if (env_len < KB_OVERHEAD || !header_matches(env, old_slot))
        return 0;
    size_t ct_len = env_len - KB_OVERHEAD;
    unsigned char tag[KB_TAG_LEN];
    memcpy(tag, env + KB_HEADER_LEN + ct_len, KB_TAG_LEN);
    put_header(out, new_slot, nonce);
    if (!gctx_start(dctx, 0, env + 24, tag) || !feed_aad(dctx, env, aad, aad_len))
        return 0;
    if (!gctx_start(ectx, 1, nonce, NULL) || !feed_aad(ectx, out, aad, aad_len))
        return 0;
    size_t off = 0;
    while (off < ct_len) {
        size_t chunk = ct_len - off;
        if (chunk > KB_REWRAP_SCRATCH)
            chunk = KB_REWRAP_SCRATCH;
        if (!gctx_update(dctx, scratch, env + KB_HEADER_LEN + off, chunk) ||
            !gctx_update(ectx, out + KB_HEADER_LEN + off, scratch, chunk))
            return 0;
        off += chunk;
    }
    /* The old tag must verify before the new envelope counts as written. */
    return gctx_finish(dctx) && gctx_finish(ectx) && gctx_tag(ectx, out + KB_HEADER_LEN + ct_len);
}

int64_t kb_rewrap_batch(kb_slot *old_slot, kb_slot *new_slot, size_t n, const unsigned char *in, size_t in_len,
                        const uint64_t *lens, const unsigned char *aad, size_t aad_len,
                        const uint64_t *aad_lens, unsigned char *out, size_t out_len, unsigned char *status)
{
    kb_batch b;
    if (old_slot == NULL || new_slot == NULL || !batch_init(&b, n, in, in_len, lens, aad, aad_len, aad_lens))
        return KB_EARG;
    if (out_len != in_len || n > (size_t)INT64_MAX || (n > 0 && (out == NULL || status == NULL)))
        return KB_EARG;
    if (!slot_is_aes(old_slot) || !slot_is_aes(new_slot))
        return KB_EKIND;
    if (n == 0)
        return 0;
    if (!slot_acquire(old_slot))
        return KB_ECLOSED;
    if (!slot_acquire(new_slot)) {
        slot_release(old_slot);
        return KB_ECLOSED;
    }

    int64_t rc = 0;
    void *dctx = NULL, *ectx = NULL;
    unsigned char *scratch = NULL;
    unsigned char small[KB_SMALL_BATCH * KB_NONCE_LEN];
    unsigned char *nonces = draw_nonces(n, small);
    if (nonces == NULL) {
        rc = KB_ECRYPTO;
        goto done;
    }
    dctx = ctx_borrow(old_slot, 0);
    ectx = ctx_borrow(new_slot, 1);
    scratch = OPENSSL_malloc(KB_REWRAP_SCRATCH);
    if (dctx == NULL || ectx == NULL || scratch == NULL) {
        rc = KB_ENOMEM;
        goto done;
    }
    atomic_fetch_add_explicit(&new_slot->uses, (uint64_t)n, memory_order_relaxed);

    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *env, *item_aad;
        size_t env_len, item_aad_len;
        if (!batch_next(&b, i, &env, &env_len, &item_aad, &item_aad_len) || env_len > out_len - off) {
            rc += fail_rest(status, i, n, out, off, out_len);
            break;
        }
        unsigned char *dst = out + off;
        if (rewrap_one(dctx, ectx, old_slot, new_slot, nonces + i * KB_NONCE_LEN, env, env_len, item_aad,
                       item_aad_len, dst, scratch)) {
            status[i] = KB_ITEM_OK;
        } else {
            if (env_len > 0)
                OPENSSL_cleanse(dst, env_len);
            status[i] = KB_ITEM_FAILED;
            rc++;
        }
        off += env_len;
    }

done:
    if (scratch != NULL)
        OPENSSL_clear_free(scratch, KB_REWRAP_SCRATCH);
    ctx_return(old_slot, 0, dctx, rc == 0);
    ctx_return(new_slot, 1, ectx, rc == 0);
    if (nonces != NULL)
        release_nonces(nonces, small);
    slot_release(new_slot);
    slot_release(old_slot);
    drop_errors_if(rc != 0);
    return rc;
}

int kb_slot_seal_header(kb_slot *slot, unsigned char *out, size_t out_len)
{
    if (slot == NULL || out == NULL)
        return KB_EARG;
    if (!slot_acquire(slot))
        return KB_ECLOSED;
    int rc = KB_OK;
    unsigned char nonce[KB_NONCE_LEN];
    if (slot->kind != KB_KIND_AES256GCM)
        rc = KB_EKIND;
    else if (out_len != KB_HEADER_LEN)
        rc = KB_EARG;
    else if (!cached_nonces(nonce, 1))
        rc = KB_ECRYPTO;
    else {
        /* Counted before the header leaves: the nonce counts against the version's bound. */
        atomic_fetch_add_explicit(&slot->uses, 1, memory_order_relaxed);
        put_header(out, slot, nonce);
    }
    OPENSSL_cleanse(nonce, sizeof(nonce));
    slot_release(slot);
    drop_errors_if(rc != KB_OK);
    return rc;
}

int kb_seal(kb_slot *slot, const unsigned char *pt, size_t pt_len, const unsigned char *aad, size_t aad_len,
            unsigned char *out, size_t out_len)
{
    unsigned char status = KB_ITEM_FAILED;
    int64_t rc = kb_seal_batch(slot, 1, pt, pt_len, NULL, aad, aad_len, NULL, out, out_len, &status);
    return rc < 0 ? (int)rc : (rc == 0 ? KB_OK : KB_ITEM_FAILED);
}

int kb_open(kb_slot *slot, const unsigned char *env, size_t env_len, const unsigned char *aad, size_t aad_len,
            unsigned char *out, size_t out_len)
{
    unsigned char status = KB_ITEM_FAILED;
    int64_t rc = kb_open_batch(slot, 1, env, env_len, NULL, aad, aad_len, NULL, out, out_len, &status);
    return rc < 0 ? (int)rc : (rc == 0 ? KB_OK : KB_ITEM_FAILED);
}

/* ------------------------------------------------------------------------ */
/* HMAC-SHA256. */

static int hmac_compute(kb_slot *s, const unsigned char *msg, size_t msg_len, unsigned char *mac)
{
    static const unsigned char empty[1] = {0};
    const EVP_MD *md = sha256_md();
    unsigned int mac_len = 0;
    int ok = md != NULL &&
             HMAC(md, s->key, (int)s->key_len, msg != NULL ? msg : empty, msg_len, mac, &mac_len) != NULL &&
             mac_len == KB_MAC_LEN;
    drop_errors_if(!ok); /* the digest's fetch can fail too */
    return ok ? KB_OK : KB_ECRYPTO;
}

int kb_hmac(kb_slot *slot, const unsigned char *msg, size_t msg_len, unsigned char *out, size_t out_len)
{
    if (slot == NULL || out == NULL || out_len < KB_MAC_LEN || (msg == NULL && msg_len != 0))
        return KB_EARG;
    if (slot->kind != KB_KIND_HMAC_SHA256)
        return KB_EKIND;
    if (!slot_acquire(slot))
        return KB_ECLOSED;
    int rc = hmac_compute(slot, msg, msg_len, out);
    slot_release(slot);
    if (rc != KB_OK)
        OPENSSL_cleanse(out, KB_MAC_LEN);
    return rc;
}

int kb_hmac_verify(kb_slot *slot, const unsigned char *msg, size_t msg_len, const unsigned char *tag,
                   size_t tag_len)
{
    if (slot == NULL || (tag == NULL && tag_len != 0) || (msg == NULL && msg_len != 0))
        return KB_EARG;
    if (slot->kind != KB_KIND_HMAC_SHA256)
        return KB_EKIND;
    if (!slot_acquire(slot))
        return KB_ECLOSED;
    unsigned char mac[KB_MAC_LEN];
    int rc = hmac_compute(slot, msg, msg_len, mac);
    slot_release(slot);
    if (rc == KB_OK)
        rc = tag_len == KB_MAC_LEN && CRYPTO_memcmp(mac, tag, KB_MAC_LEN) == 0;
    OPENSSL_cleanse(mac, sizeof(mac));
    return rc;
}


/* --- fdatasync off the event loop ----------------------------------------- */

/* Flushes run on a few threads kept for the life of the process. A thread
 * started per flush cost about as much CPU as the flush itself and added as
 * much again to its latency. At most KB_FLUSHERS flushes run at once; more
 * wait their turn, oldest first. */
#define KB_FLUSHERS 8u
/* Stack of a flushing thread: it makes a few system calls, nothing more. */
#define KB_SYNC_STACK ((size_t)64 * 1024)

typedef struct kb_sync_job {
    int fd;        /* duplicate of the file to flush: closed once flushed */
    int notify_fd; /* duplicate of the caller's eventfd: closed once written */
    struct kb_sync_job *next;
} kb_sync_job;

/* The queue and the threads' counts, all under flush_mu. */
static pthread_mutex_t flush_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t flush_cv = PTHREAD_COND_INITIALIZER;
static kb_sync_job *flush_head, *flush_tail; /* waiting jobs, oldest first */
static unsigned flush_queued;  /* jobs in the queue */
static unsigned flush_threads; /* flushing threads alive */
static unsigned flush_idle;    /* of those, waiting for a job */
static pthread_once_t flush_once = PTHREAD_ONCE_INIT;
static int flush_init_error; /* set once by kb_flush_init */

static void kb_sync_job_free(kb_sync_job *job)
{
    close(job->fd);
    close(job->notify_fd);
    free(job);
}

static void kb_sync_run(kb_sync_job *job)
{
    /* An eventfd write of 0 would wake nobody: success is 1, failure 1 + errno. */
    uint64_t outcome = 1;
    if (fdatasync(job->fd) != 0)
        outcome = 1 + (uint64_t)errno;
    ssize_t written;
    do {
        written = write(job->notify_fd, &outcome, sizeof outcome);
    } while (written < 0 && errno == EINTR);
    /* An eventfd write of 8 bytes either succeeds whole or fails (only on
     * counter overflow, impossible with one write per eventfd); the caller
     * then waits in vain, which a short write could not make better. */
    kb_sync_job_free(job);
}

static void *kb_flusher_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&flush_mu);
    for (;;) {
        while (flush_head == NULL) {
            flush_idle++;
            pthread_cond_wait(&flush_cv, &flush_mu);
            flush_idle--;
        }
        kb_sync_job *job = flush_head;
        flush_head = job->next;
        if (flush_head == NULL)
            flush_tail = NULL;
        flush_queued--;
        pthread_mutex_unlock(&flush_mu);
        kb_sync_run(job);
        pthread_mutex_lock(&flush_mu);
    }
    return NULL;
}

/* fork() keeps only the calling thread: the child starts with no flushers.
 * Jobs queued at the fork are the parent's; the child drops its copies. */
static void kb_flush_prepare(void) { pthread_mutex_lock(&flush_mu); }
static void kb_flush_parent(void) { pthread_mutex_unlock(&flush_mu); }
static void kb_flush_child(void)
{
    kb_sync_job *job = flush_head;
    while (job != NULL) {
        kb_sync_job *next = job->next;
        kb_sync_job_free(job);
        job = next;
    }
    flush_head = flush_tail = NULL;
    flush_queued = flush_threads = flush_idle = 0;
    /* The prepare handler locked flush_mu in this very thread, the only one
     * the child has: it may unlock it. The condition variable may still
     * count the parent's waiting flushers, which the child does not have:
     * it starts from a fresh one. */
    static const pthread_cond_t fresh = PTHREAD_COND_INITIALIZER;
    flush_cv = fresh;
    pthread_mutex_unlock(&flush_mu);
}

static void kb_flush_init(void)
{
    /* Without the handlers a forked child would queue jobs for threads it
     * does not have, so no flush is taken without them. */
    flush_init_error = pthread_atfork(kb_flush_prepare, kb_flush_parent, kb_flush_child);
}

/* Starts one more flushing thread (flush_mu held); 0 or an errno. */
static int kb_flusher_start(void)
{
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc != 0)
        return rc;
    rc = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (rc == 0)
        rc = pthread_attr_setstacksize(&attr, KB_SYNC_STACK);
    pthread_t thread;
    if (rc == 0)
        rc = pthread_create(&thread, &attr, kb_flusher_main, NULL);
    pthread_attr_destroy(&attr);
    if (rc == 0)
        flush_threads++;
    return rc;
}

int kb_fdatasync_start(int fd, int notify_fd)
{
    int rc = pthread_once(&flush_once, kb_flush_init);
    if (rc != 0)
        return rc;
    if (flush_init_error != 0)
        return flush_init_error;
    kb_sync_job *job = malloc(sizeof *job);
    if (job == NULL)
        return ENOMEM;
    job->next = NULL;
    job->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (job->fd < 0) {
        int err = errno;
        free(job);
        return err;
    }
    job->notify_fd = fcntl(notify_fd, F_DUPFD_CLOEXEC, 0);
    if (job->notify_fd < 0) {
        int err = errno;
        close(job->fd);
        free(job);
        return err;
    }
    pthread_mutex_lock(&flush_mu);
    if (flush_idle > flush_queued) {
        /* An idle thread is left over once the queued jobs are taken. */
        rc = pthread_cond_signal(&flush_cv);
    } else if (flush_threads < KB_FLUSHERS) {
        rc = kb_flusher_start();
        /* Without a new thread the job still runs: every thread alive
         * comes back to the queue once its flush is done. */
        if (rc != 0 && flush_threads > 0)
            rc = 0;
    }
    if (rc == 0) {
        if (flush_tail == NULL)
            flush_head = job;
        else
            flush_tail->next = job;
        flush_tail = job;
        flush_queued++;
    }
    pthread_mutex_unlock(&flush_mu);
    if (rc != 0)
        kb_sync_job_free(job);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Arenas for CPython's small-object allocator.
 *
 * pymalloc carves objects of up to 512 bytes out of arenas it maps one at a
 * time (1 MiB on 64-bit CPython 3.11), and unmaps an arena as soon as its
 * last object is freed. A batch call makes and drops hundreds of thousands
 * of small objects (each item and each envelope is one), so every batch
 * mapped its arenas afresh and page-faulted them in again: the heap
 * thresholds of broker/allocator.py do not reach memory that never comes
 * from malloc. Kept arenas keep their pages, so the next batch reuses them.
 * CPython calls these functions with the GIL held (for pymalloc's arenas,
 * and for the chunks of its threads' frame stacks, 16 KiB and up), which
 * also guards the state below. Only blocks of at least KB_ARENA_MIN_KEPT
 * bytes are kept, each with its size, and a kept block is handed out again
 * only for a request of that same size: the frame-stack chunks pass
 * through, whichever comes first.
 */

enum { KB_ARENAS_KEPT_MAX = 1024, KB_ARENA_MIN_KEPT = 256 * 1024 };

static kb_arena_allocator arena_inner;
static kb_arena_allocator arena_outer;
static int arena_installed;
static struct {
    void *ptr;
    size_t size;
} arena_kept[KB_ARENAS_KEPT_MAX];
static size_t arena_kept_n;
static size_t arena_kept_bytes; /* sum of the kept blocks' sizes, <= arena_keep_bytes */
static size_t arena_keep_bytes;

static void *kb_arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    if (size >= KB_ARENA_MIN_KEPT) {
        /* Newest first; every kept block has the same size in practice. */
        for (size_t i = arena_kept_n; i-- > 0;) {
            if (arena_kept[i].size != size)
                continue;
            void *ptr = arena_kept[i].ptr;
            arena_kept[i] = arena_kept[--arena_kept_n];
            arena_kept_bytes -= size;
            return ptr;
        }
    }
    return arena_inner.alloc(arena_inner.ctx, size);
}

static void kb_arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL)
        return;
    if (size >= KB_ARENA_MIN_KEPT && arena_kept_n < KB_ARENAS_KEPT_MAX &&
        size <= arena_keep_bytes - arena_kept_bytes) {
        arena_kept[arena_kept_n].ptr = ptr;
        arena_kept[arena_kept_n].size = size;
        arena_kept_n++;
        arena_kept_bytes += size;
        return;
    }
    arena_inner.free(arena_inner.ctx, ptr, size);
}

const kb_arena_allocator *kb_arena_cache(const kb_arena_allocator *inner, size_t keep_bytes)
{
    if (!arena_installed) {
        if (inner == NULL || inner->alloc == NULL || inner->free == NULL)
            return NULL;
        arena_inner = *inner;
        arena_keep_bytes = keep_bytes;
        arena_outer.ctx = NULL;
        arena_outer.alloc = kb_arena_alloc;
        arena_outer.free = kb_arena_free;
        arena_installed = 1;
    }
    return &arena_outer;
}
