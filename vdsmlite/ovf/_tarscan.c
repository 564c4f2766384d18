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
 * Returns (where it stopped, [header offset of each accepted member], [its
 * entity id: the name without ".ovf", lower case]). What is kept per member
 * (duplicates, split points) is Python's; it gets the ids made here because
 * making 88,000 of them a GiB in Python was a third of the checks' cost.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

static const char MAGIC_POSIX[8] = {'u', 's', 't', 'a', 'r', '\0', '0', '0'};
static const char MAGIC_GNU[8] = {'u', 's', 't', 'a', 'r', ' ', ' ', '\0'};

static int is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
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

/* Exactly 8-4-4-4-12 hex digits and ".ovf", then the NUL ending the name. */
static int is_ovf_name(const unsigned char *h)
{
    static const int dashes[] = {8, 13, 18, 23};

    for (int i = 0; i < 36; i++) {
        int dash = (i == dashes[0] || i == dashes[1] || i == dashes[2] || i == dashes[3]);
        if (dash ? h[i] != '-' : !is_hex(h[i]))
            return 0;
    }
    return memcmp(h + 36, ".ovf", 4) == 0 && h[40] == '\0';
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

/* The member whose header is at `buf + pos`, accepted: where the next header is;
 * or 0 (never a valid next position: it is at least pos + 2 blocks). */
static Py_ssize_t accept(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t n,
                         long long max_member, const struct declarations *known)
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
    if (!is_ovf_name(h))
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

/* The entity id of the accepted member whose header is at `h`: its name's 36
 * characters (checked by is_ovf_name: hex digits and dashes), lower case. */
static PyObject *entity_id(const unsigned char *h)
{
    PyObject *id = PyUnicode_New(36, 127);

    if (id == NULL)
        return NULL;
    for (int i = 0; i < 36; i++) {
        unsigned char c = h[i];
        PyUnicode_1BYTE_DATA(id)[i] = (c >= 'A' && c <= 'F') ? (unsigned char)(c + 32) : c;
    }
    return id;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, n, count = 0, capacity = 64;
    long long max_member;
    PyObject *declarations;
    struct declarations known = {0};
    Py_ssize_t *found;
    PyObject *offsets, *ids, *result;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnLO!", &view, &pos, &n, &max_member, &PyTuple_Type,
                          &declarations))
        return NULL;
    if (pos < 0 || n > view.len || pos > n) {
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
    found = PyMem_RawMalloc(capacity * sizeof(*found));
    if (found == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        Py_ssize_t next = accept((const unsigned char *)view.buf, pos, n, max_member,
                                 &known);
        if (next == 0)
            break;
        if (count == capacity) {
            Py_ssize_t *grown = PyMem_RawRealloc(found, 2 * capacity * sizeof(*found));
            if (grown == NULL)
                break;  /* what is found so far is returned; Python goes on from pos */
            found = grown;
            capacity *= 2;
        }
        found[count++] = pos;
        pos = next;
    }
    Py_END_ALLOW_THREADS
    offsets = PyList_New(count);
    if (offsets == NULL) {
        PyBuffer_Release(&view);
        PyMem_RawFree(found);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *offset = PyLong_FromSsize_t(found[i]);
        if (offset == NULL) {
            Py_DECREF(offsets);
            PyBuffer_Release(&view);
            PyMem_RawFree(found);
            return NULL;
        }
        PyList_SET_ITEM(offsets, i, offset);
    }
    ids = PyList_New(count);
    if (ids == NULL) {
        Py_DECREF(offsets);
        PyBuffer_Release(&view);
        PyMem_RawFree(found);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *id = entity_id((const unsigned char *)view.buf + found[i]);
        if (id == NULL) {
            Py_DECREF(offsets);
            Py_DECREF(ids);
            PyBuffer_Release(&view);
            PyMem_RawFree(found);
            return NULL;
        }
        PyList_SET_ITEM(ids, i, id);
    }
    PyMem_RawFree(found);
    PyBuffer_Release(&view);
    result = Py_BuildValue("(nNN)", pos, offsets, ids);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buffer, pos, n, max_member, declarations) -> (stop, [header offsets], [ids])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vdsmlite.ovf._tarscan",
    "The OVF_STORE upload's hot loop (see tarstream.TarValidator).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarscan(void)
{
    return PyModule_Create(&module);
}
