/*
 * The chunked decoder's common case in C (see wire.ChunkedDecoder).
 *
 * `decode(buffer, out, pos, end, state, remaining)` decodes raw bytes at
 * buffer[pos:end] in place, data moved down to `out`, for as long as they are
 * what an upload nearly always sends: chunk data, the CRLF after it, and a
 * chunk-size line of hex digits and CRLF, each wholly within `end`. It stops,
 * without consuming it, at anything else - a line cut by `end`, a chunk
 * extension, the last chunk (size 0) and its trailer, a malformed line - and
 * Python's decoder takes that from there (and says what is wrong, if anything).
 *
 * States, as wire._State numbers them here: 0 DATA, 1 DATA_END, 2 SIZE.
 * Returns (out, pos, state, remaining).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

enum { DATA = 0, DATA_END = 1, SIZE = 2 };

#define MAX_HEX 16 /* as wire._HEX: at most 16 hex digits */

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static PyObject *decode(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t out, pos, end;
    int state;
    unsigned long long remaining;
    unsigned char *buf;

    (void)self;
    if (!PyArg_ParseTuple(args, "w*nnniK", &view, &out, &pos, &end, &state, &remaining))
        return NULL;
    if (out < 0 || out > pos || pos > end || end > view.len || state < DATA || state > SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "decode: positions or state out of range");
        return NULL;
    }
    buf = view.buf;
    while (pos < end) {
        if (state == DATA) {
            Py_ssize_t take = end - pos;
            if ((unsigned long long)take > remaining)
                take = (Py_ssize_t)remaining;
            if (out != pos)
                memmove(buf + out, buf + pos, (size_t)take);
            out += take;
            pos += take;
            remaining -= (unsigned long long)take;
            if (remaining == 0)
                state = DATA_END;
        } else if (state == DATA_END) {
            if (end - pos < 2 || buf[pos] != '\r' || buf[pos + 1] != '\n')
                break;
            pos += 2;
            state = SIZE;
        } else {
            unsigned long long size = 0;
            Py_ssize_t i = pos;
            while (i < end && i - pos < MAX_HEX && hex_value(buf[i]) >= 0)
                size = size * 16 + (unsigned long long)hex_value(buf[i++]);
            if (i == pos || end - i < 2 || buf[i] != '\r' || buf[i + 1] != '\n' || size == 0)
                break;
            pos = i + 2;
            remaining = size;
            state = DATA;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nniK)", out, pos, state, remaining);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(buffer, out, pos, end, state, remaining) -> (out, pos, state, remaining)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vdsmlite.http._chunked",
    "The chunked decoder's common case (see wire.ChunkedDecoder).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__chunked(void)
{
    return PyModule_Create(&module);
}
