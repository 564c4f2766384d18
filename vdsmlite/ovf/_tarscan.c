/*
 * The OVF_STORE upload's hot loop in C: the run of ordinary `<uuid>.ovf` members
 * lying wholly in a buffer, checked without the GIL.
 *
 * `scan(buffer, pos, n, max_member, declarations)` walks the members from `pos`
 * while each one is, beyond doubt, what `tarstream.TarValidator` would accept
 * in its Python hot loop (`_python_members`): a ustar header of a regular file
 * whose unsigned checksum matches, no directory prefix, a name that is exactly
 * `<uuid>.ovf`, an octal size within `max_member`, data and padding wholly
 * before `n`, the data beginning with one of `declarations` (XML declarations
 * Python has already found acceptable), no `!` that opens DTD markup (the
 * rule of `tarstream._refuses_markup`) and zeros in the padding. It stops
 * at the first member that is anything else, without judging it: the Python
 * code takes over there, checks that member the long way (and says what is
 * wrong with it, if anything) and hands back. So this code only has to be right
 * about what it accepts; whatever it is unsure of, Python decides.
 *
 * It also keeps what the archive needs remembered per member, so that no
 * Python object is made per member (88,000 a GiB: ids, offsets, set entries
 * were a third of the checks' cost): the entity ids seen, in an `IdTable` (a
 * capsule; `id_add` puts in those Python accepts itself), where a member whose
 * id is already there stops the scan (Python reports the duplicate), and the
 * split points, the first member header at or after each `split_bytes`.
 *
 * Returns (where it stopped, the accepted members' entity ids as one bytes
 * object of 36 lower-case characters each, [split points, absolute], the next
 * split threshold).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512
#define ID_LEN 36
#define TABLE_NAME "vdsmlite.ovf._tarscan.IdTable"

static const char MAGIC_POSIX[8] = {'u', 's', 't', 'a', 'r', '\0', '0', '0'};
static const char MAGIC_GNU[8] = {'u', 's', 't', 'a', 'r', ' ', ' ', '\0'};

/* Each byte's value as a hex digit (either case), or NOT_HEX; filled at import. */
#define NOT_HEX 0x80
static unsigned char HEX[256];

static void fill_hex(void)
{
    memset(HEX, NOT_HEX, sizeof(HEX));
    for (int c = '0'; c <= '9'; c++)
        HEX[c] = (unsigned char)(c - '0');
    for (int c = 'a'; c <= 'f'; c++)
        HEX[c] = HEX[c - 32] = (unsigned char)(c - 'a' + 10);
}

/* A numeric field as the Python loop reads it: up to the first NUL, spaces
 * stripped at both ends, then one or more octal digits. -1 if it is not. */
static long long octal_field(const unsigned char *field, size_t width)
{
    size_t end = 0, start = 0;
    long long value = 0;

    while (end < width && field[end] != '\0')
        end++;
    while (start < end && field[start] == ' ')
        start++;
    while (end > start && field[end - 1] == ' ')
        end--;
    if (start == end)
        return -1;
    for (size_t i = start; i < end; i++) {
        if (field[i] < '0' || field[i] > '7')
            return -1;
        value = value * 8 + (field[i] - '0');
    }
    return value;
}

/* Where an id's 32 hex digits are: 8-4-4-4-12, dashes between. */
static const unsigned char DIGITS[32] = {
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17,
    19, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35,
};

/* Exactly 8-4-4-4-12 hex digits (either case): 1 and its 128 bits in `key`, or 0.
 * One pass with no branch per digit (this ran for every member: checking the id
 * and reading its bits were two passes of a branch per character before). */
static int parse_id(const unsigned char *h, uint64_t key[2])
{
    unsigned char bad = 0;

    key[0] = key[1] = 0;
    for (int i = 0; i < 32; i++) {
        unsigned char v = HEX[h[DIGITS[i]]];
        bad |= v;
        key[i >> 4] = (key[i >> 4] << 4) | (v & 0x0F);
    }
    return !(bad & NOT_HEX) && h[8] == '-' && h[13] == '-' && h[18] == '-' && h[23] == '-';
}

/* An entity id, ".ovf", then the NUL ending the name: 1 and the id's bits, or 0. */
static int parse_ovf_name(const unsigned char *h, uint64_t key[2])
{
    return memcmp(h + ID_LEN, ".ovf", 4) == 0 && h[ID_LEN + 4] == '\0' && parse_id(h, key);
}

/* --- the entity ids seen: a set of 128-bit keys, open addressing ------------ */

struct idtable {
    uint64_t seed[2];   /* secret per table: crafted ids cannot aim at one slot */
    size_t capacity;    /* a power of two, at least twice `count` */
    size_t count;
    uint64_t *keys;     /* two words a slot; both zero: the slot is free */
    int has_zero;       /* the nil id (all zero bits), kept beside the slots */
};

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static int is_free(const uint64_t *slot)
{
    return slot[0] == 0 && slot[1] == 0;
}

static size_t slot_of(const struct idtable *t, const uint64_t key[2])
{
    return (size_t)(mix(key[0] ^ t->seed[0]) ^ mix(key[1] ^ t->seed[1])) & (t->capacity - 1);
}

static int table_grow(struct idtable *t)
{
    size_t capacity = t->capacity ? t->capacity * 2 : 4096;
    uint64_t *keys = calloc(capacity, 2 * sizeof(*keys));
    struct idtable grown = {{t->seed[0], t->seed[1]}, capacity, 0, keys, 0};

    if (keys == NULL)
        return -1;
    for (size_t i = 0; i < t->capacity; i++) {
        if (is_free(t->keys + 2 * i))
            continue;
        size_t slot = slot_of(&grown, t->keys + 2 * i);
        while (!is_free(keys + 2 * slot))
            slot = (slot + 1) & (capacity - 1);
        keys[2 * slot] = t->keys[2 * i];
        keys[2 * slot + 1] = t->keys[2 * i + 1];
    }
    free(t->keys);
    t->keys = keys;
    t->capacity = capacity;
    return 0;
}

/* 1: added; 0: it was there; -1: no memory. Needs no GIL. One array of slots
 * (no separate "used" flags): a lookup touches one cache line, not two. */
static int table_add(struct idtable *t, const uint64_t key[2])
{
    size_t slot;

    if (key[0] == 0 && key[1] == 0) {
        if (t->has_zero)
            return 0;
        t->has_zero = 1;
        return 1;
    }
    if (2 * (t->count + 1) > t->capacity && table_grow(t) < 0)
        return -1;
    slot = slot_of(t, key);
    while (!is_free(t->keys + 2 * slot)) {
        if (t->keys[2 * slot] == key[0] && t->keys[2 * slot + 1] == key[1])
            return 0;
        slot = (slot + 1) & (t->capacity - 1);
    }
    t->keys[2 * slot] = key[0];
    t->keys[2 * slot + 1] = key[1];
    t->count++;
    return 1;
}

static void table_free(PyObject *capsule)
{
    struct idtable *t = PyCapsule_GetPointer(capsule, TABLE_NAME);

    if (t == NULL)
        return;
    free(t->keys);
    free(t);
}

static PyObject *id_table(PyObject *self, PyObject *args)
{
    Py_buffer seed;
    struct idtable *t;
    PyObject *capsule;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &seed))
        return NULL;
    if (seed.len != 16) {
        PyBuffer_Release(&seed);
        PyErr_SetString(PyExc_ValueError, "IdTable: the seed is 16 bytes");
        return NULL;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        PyBuffer_Release(&seed);
        return PyErr_NoMemory();
    }
    memcpy(t->seed, seed.buf, 16);
    PyBuffer_Release(&seed);
    capsule = PyCapsule_New(t, TABLE_NAME, table_free);
    if (capsule == NULL)
        free(t);
    return capsule;
}

static PyObject *id_add(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    const char *id;
    Py_ssize_t len;
    struct idtable *t;
    uint64_t key[2];
    int added;

    (void)self;
    if (!PyArg_ParseTuple(args, "Os#", &capsule, &id, &len))
        return NULL;
    t = PyCapsule_GetPointer(capsule, TABLE_NAME);
    if (t == NULL)
        return NULL;
    if (len != ID_LEN || !parse_id((const unsigned char *)id, key)) {
        PyErr_SetString(PyExc_ValueError, "id_add: not an entity id");
        return NULL;
    }
    added = table_add(t, key);
    if (added < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(added);
}

/* tarstream._refuses_markup for each "!" in data[start:end]: does one open DTD
 * markup? In UTF-8 "<!" then anything but "-" (comment) or "[" (CDATA); in UTF-16
 * (either byte order) "<", NUL, "!" and then that character, maybe after a NUL. */
static int opens_dtd(const unsigned char *buf, Py_ssize_t start, Py_ssize_t end)
{
    const unsigned char *hit = memchr(buf + start, '!', (size_t)(end - start));

    while (hit != NULL) {
        Py_ssize_t at = hit - buf;
        int following = -1;

        if (at - 1 >= start && buf[at - 1] == '<') {
            if (at + 1 < end)
                following = buf[at + 1];
        } else if (at - 2 >= start && buf[at - 2] == '<' && buf[at - 1] == '\0') {
            if (at + 1 < end && buf[at + 1] == '\0') {
                if (at + 2 < end)
                    following = buf[at + 2];
            } else if (at + 1 < end) {
                following = buf[at + 1];
            }
        }
        if (following != -1 && following != '-' && following != '[')
            return 1;
        hit = at + 1 < end ? memchr(buf + at + 1, '!', (size_t)(end - at - 1)) : NULL;
    }
    return 0;
}

struct declarations {
    Py_ssize_t count;
    const char *bytes[8];
    Py_ssize_t len[8];
};

static int starts_with_one(const unsigned char *data, Py_ssize_t size,
                           const struct declarations *known)
{
    for (Py_ssize_t i = 0; i < known->count; i++)
        if (known->len[i] > 0 && known->len[i] <= size &&
                memcmp(data, known->bytes[i], (size_t)known->len[i]) == 0)
            return 1;
    return 0;
}

static const unsigned char ZEROS[BLOCK];

/* len <= BLOCK (a header's field or a member's padding); memcmp is vectorized. */
static int all_zero(const unsigned char *p, size_t len)
{
    return memcmp(p, ZEROS, len) == 0;
}

/* The unsigned sum of a header's bytes with its checksum field read as spaces, as
 * ustar defines the checksum. Eight bytes at a time (the per-byte loop was most of
 * this file's time): each word's bytes are added pairwise into four 16-bit lanes,
 * which cannot overflow in 64 words (at most 2 * 255 * 64 = 32640 each). */
static unsigned long header_sum(const unsigned char *h)
{
    const uint64_t lanes = 0x00FF00FF00FF00FFULL;
    uint64_t acc = 0;
    unsigned long sum = 0;

    for (int i = 0; i < BLOCK; i += 8) {
        uint64_t word;
        memcpy(&word, h + i, 8);
        acc += (word & lanes) + ((word >> 8) & lanes);
    }
    for (int lane = 0; lane < 4; lane++)
        sum += (acc >> (16 * lane)) & 0xFFFF;
    for (int i = 148; i < 156; i++)
        sum -= h[i];
    return sum + 8 * ' ';
}

/* The member whose header is at `buf + pos`, accepted: where the next header is,
 * its entity id's bits in `key`; or 0 (never a valid next position: it is at
 * least pos + 2 blocks). */
static Py_ssize_t accept(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t n,
                         long long max_member, const struct declarations *known,
                         uint64_t key[2])
{
    const unsigned char *h = buf + pos;
    unsigned long sum = 0;
    long long stored, size;
    Py_ssize_t start, end, padded;

    if (pos + BLOCK > n || h[0] == '\0')
        return 0;
    stored = octal_field(h + 148, 8);
    if (stored < 0)
        return 0;
    if (memcmp(h + 257, MAGIC_POSIX, 8) != 0 && memcmp(h + 257, MAGIC_GNU, 8) != 0)
        return 0;
    if (h[156] != '0' && h[156] != '\0')
        return 0;
    if (!all_zero(h + 345, 155))
        return 0;
    sum = header_sum(h);
    if ((long long)sum != stored)
        return 0;
    if (!parse_ovf_name(h, key))
        return 0;
    size = octal_field(h + 124, 12);
    if (size <= 0 || size > max_member)
        return 0;
    start = pos + BLOCK;
    end = start + (Py_ssize_t)size;
    padded = end + (Py_ssize_t)((BLOCK - size % BLOCK) % BLOCK);
    if (padded > n)
        return 0;
    if (!starts_with_one(buf + start, end - start, known))
        return 0;
    if (opens_dtd(buf, start, end))
        return 0;
    if (!all_zero(buf + end, (size_t)(padded - end)))
        return 0;
    return padded;
}

struct found {
    char *ids;              /* ID_LEN lower-case characters a member */
    Py_ssize_t count, capacity;
    Py_ssize_t *splits;
    Py_ssize_t split_count, split_capacity;
};

/* Room for one more id and, if `split`, one more split point: 0, or -1 (no
 * memory; nothing changed). */
static int reserve(struct found *f, int split)
{
    if (f->count == f->capacity) {
        Py_ssize_t capacity = f->capacity ? 2 * f->capacity : 256;
        char *ids = realloc(f->ids, (size_t)capacity * ID_LEN);
        if (ids == NULL)
            return -1;
        f->ids = ids;
        f->capacity = capacity;
    }
    if (split && f->split_count == f->split_capacity) {
        Py_ssize_t capacity = f->split_capacity ? 2 * f->split_capacity : 8;
        Py_ssize_t *splits = realloc(f->splits, (size_t)capacity * sizeof(*splits));
        if (splits == NULL)
            return -1;
        f->splits = splits;
        f->split_capacity = capacity;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, n, base, next_split, split_bytes;
    long long max_member;
    PyObject *declarations, *capsule, *ids = NULL, *splits = NULL, *result = NULL;
    struct declarations known = {0};
    struct idtable *table;
    struct found found = {0};

    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnLO!Onnn", &view, &pos, &n, &max_member, &PyTuple_Type,
                          &declarations, &capsule, &base, &next_split, &split_bytes))
        return NULL;
    table = PyCapsule_GetPointer(capsule, TABLE_NAME);
    if (table == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (pos < 0 || n > view.len || pos > n || split_bytes <= 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan: positions outside the buffer");
        return NULL;
    }
    /* The tuple (an argument: alive for the whole call) keeps these bytes alive. */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(declarations) && known.count < 8; i++) {
        PyObject *item = PyTuple_GET_ITEM(declarations, i);
        if (!PyBytes_Check(item))
            continue;
        known.bytes[known.count] = PyBytes_AS_STRING(item);
        known.len[known.count] = PyBytes_GET_SIZE(item);
        known.count++;
    }
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        const unsigned char *h = (const unsigned char *)view.buf + pos;
        uint64_t key[2];
        Py_ssize_t next = accept((const unsigned char *)view.buf, pos, n, max_member,
                                 &known, key);
        int split = base + pos >= next_split;

        if (next == 0)
            break;
        /* An id seen before (Python reports it) or no memory stops the scan at this
         * member, nothing of it kept: Python goes on from there. */
        if (reserve(&found, split) < 0 || table_add(table, key) != 1)
            break;
        for (int i = 0; i < ID_LEN; i++) {
            unsigned char c = h[i];
            found.ids[found.count * ID_LEN + i] = (char)((c >= 'A' && c <= 'F') ? c + 32 : c);
        }
        found.count++;
        if (split) {
            found.splits[found.split_count++] = base + pos;
            next_split = base + pos + split_bytes;
        }
        pos = next;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    ids = PyBytes_FromStringAndSize(found.ids ? found.ids : "", found.count * ID_LEN);
    if (ids == NULL)
        goto done;
    splits = PyList_New(found.split_count);
    if (splits == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < found.split_count; i++) {
        PyObject *at = PyLong_FromSsize_t(found.splits[i]);
        if (at == NULL)
            goto done;
        PyList_SET_ITEM(splits, i, at);
    }
    result = Py_BuildValue("(nOOn)", pos, ids, splits, next_split);
done:
    Py_XDECREF(ids);
    Py_XDECREF(splits);
    free(found.ids);
    free(found.splits);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buffer, pos, n, max_member, declarations, table, base, next_split, split_bytes)"
     " -> (stop, ids, [split points], next_split)"},
    {"IdTable", id_table, METH_VARARGS, "IdTable(seed: 16 bytes) -> an empty id table"},
    {"id_add", id_add, METH_VARARGS,
     "id_add(table, entity_id) -> True if it was not in the table (now it is)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vdsmlite.ovf._tarscan",
    "The OVF_STORE upload's hot loop (see tarstream.TarValidator).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarscan(void)
{
    fill_hex();
    return PyModule_Create(&module);
}
