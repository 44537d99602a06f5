/*
 * sfmon._speedups: the per-request hot path of sfmon.Monitor in C.
 *
 * Optional: sfmon/middleware.py holds the same logic in Python and uses it when this
 * module is absent (no compiler at install time) or SFMON_SPEEDUPS=0. Only the common
 * case runs here: a sync worker (wsgi.multithread false), this process's store writer
 * already set up and checked within the second, an inbound request id and traceparent
 * that are absent or plain, and a request that ended below 400 with a route label
 * already set. Everything else (the first request of a process, endpoints,
 * errors, 499s, gthread workers, odd input) is handed to the Python functions that
 * middleware.py registers with setup(), which are the reference behaviour; the tests
 * run both against the same inputs and compare the store and the access records.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define VALUE_SCALE 65536 /* store.VALUE_SCALE: counter units per 1.0 */
#define NATIVE_BLOCK 16   /* store.NATIVE_BLOCK: native buckets per block */
#define MAX_ROUTE 200     /* longer sfmon.route values go through routes.route_label */

/* Python helpers registered by middleware.py through setup(). */
static PyObject *g_finish;        /* _finish(call): the full finish, any case */
static PyObject *g_sinks;         /* _sinks(call, method, label, route, status, ms, exc) */
static PyObject *g_status_code;   /* _status_code(line) -> int, caches in g_status_codes */
static PyObject *g_status_codes;  /* dict: status line -> code */
static PyObject *g_fix_headers;   /* _with_request_id(headers, lower, name, rid) */
static PyObject *g_store_failure; /* _store_failed(exc) */
static PyObject *g_store_dict;    /* sfmon.store.__dict__ (for its _writer) */
static PyObject *g_rid_var;       /* request_id.current_request_id */
static PyObject *g_tid_var;       /* request_id.current_trace_id */
static PyObject *g_methods;       /* routes.STANDARD_METHODS */
static PyObject *g_other_method;  /* routes.OTHER_METHOD */
static PyObject *g_record_type;   /* record.RequestRecord */
static PyObject *g_sink_failed;   /* _sink_failed(sink, exc): report once */

static PyObject *s_writer, *s_check_at, *s_q, *s_blocks, *s_slots, *s_call_py,
    *s_close, *s_write, *k_monitor, *k_request_id, *k_path_info, *k_multithread,
    *k_traceparent, *k_route, *k_method, *s_empty, *k_user_id, *k_remote_user, *k_script_name,
    *k_remote_addr;

/* -- request ids ------------------------------------------------------------------ */

/* How often the C path served a whole call / a whole finish (for tests and doctor). */
static unsigned long long n_fast_calls, n_fast_finishes;

static char rid_prefix[16];
static uint64_t rid_counter;
static const char HEX[] = "0123456789abcdef";

static PyObject *
new_rid(void)
{
    PyObject *s = PyUnicode_New(32, 127);
    if (s == NULL)
        return NULL;
    Py_UCS1 *p = PyUnicode_1BYTE_DATA(s);
    memcpy(p, rid_prefix, 16);
    uint64_t c = rid_counter++;
    for (int i = 31; i >= 16; i--) {
        p[i] = (Py_UCS1)HEX[c & 15];
        c >>= 4;
    }
    return s;
}

static PyObject *
sp_new_request_id(PyObject *mod, PyObject *unused)
{
    return new_rid();
}

static PyObject *
sp_reseed(PyObject *mod, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len != 12) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "reseed needs 12 random bytes");
        return NULL;
    }
    const unsigned char *r = b.buf;
    for (int i = 0; i < 8; i++) {
        rid_prefix[2 * i] = HEX[r[i] >> 4];
        rid_prefix[2 * i + 1] = HEX[r[i] & 15];
    }
    /* The counter starts below 2**32, so it stays within its 16 hex digits. */
    rid_counter = ((uint64_t)r[8] << 24) | ((uint64_t)r[9] << 16) | ((uint64_t)r[10] << 8) | r[11];
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* request_id.REQUEST_ID_PATTERN: [A-Za-z0-9][A-Za-z0-9._:-]{0,127} */
static int
rid_ok(PyObject *v)
{
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    if (n < 1 || n > 128)
        return 0;
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(v);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS1 c = p[i];
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (!alnum && (i == 0 || !(c == '.' || c == '_' || c == ':' || c == '-')))
            return 0;
    }
    return 1;
}

static PyObject *g_clock; /* a test clock (set_clock), else NULL */

static int
lower_hex(const Py_UCS1 *p, int n, int *nonzero)
{
    for (int i = 0; i < n; i++) {
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
            return 0;
        if (p[i] != '0')
            *nonzero = 1;
    }
    return 1;
}

/* request_id.parse_traceparent for a value without surrounding blanks: 1 and the trace
 * id in *out when valid, 0 when invalid (no trace id), -1 when Python must decide. */
static int
traceparent(PyObject *v, PyObject **out)
{
    *out = NULL;
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v))
        return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    if (n == 0)
        return 0;
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(v);
    if (p[0] <= ' ' || p[n - 1] <= ' ')
        return -1; /* str.strip() first: leave that to Python */
    if (n != 55 || p[2] != '-' || p[35] != '-' || p[52] != '-')
        return 0;
    int nz_version = 0, nz_trace = 0, nz_parent = 0, nz_flags = 0;
    if (!lower_hex(p, 2, &nz_version) || !lower_hex(p + 3, 32, &nz_trace) ||
        !lower_hex(p + 36, 16, &nz_parent) || !lower_hex(p + 53, 2, &nz_flags))
        return 0;
    if ((p[0] == 'f' && p[1] == 'f') || !nz_trace || !nz_parent)
        return 0;
    *out = PyUnicode_Substring(v, 3, 35);
    return *out == NULL ? -1 : 1;
}

/* time.perf_counter() on Linux and macOS: the monotonic clock. */
static double
now(void)
{
    if (g_clock != NULL) {
        PyObject *t = PyObject_CallNoArgs(g_clock);
        double v = t != NULL ? PyFloat_AsDouble(t) : -1.0;
        Py_XDECREF(t);
        if (!(v == -1.0 && PyErr_Occurred()))
            return v;
        PyErr_Clear();
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define ISNONE(x) ((x) == NULL || (x) == Py_None)

/* sys.exc_info() of the exception being raised, which stays raised. */
static PyObject *
exc_info_of_current(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    PyObject *info = PyTuple_Pack(3, t ? t : Py_None, v ? v : Py_None, tb ? tb : Py_None);
    PyErr_Restore(t, v, tb);
    return info; /* NULL only if out of memory; the original error is then lost */
}

/* -- the monitor ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *app;
    PyObject *prefix;
    PyObject *header;
    PyObject *header_lower;
    PyObject *header_env;
    PyObject *writer;
    PyObject *cache;
    PyObject *sinks;
    Py_ssize_t inprog_slot;
    char fast; /* T_BOOL: one byte */
    /* the latency histogram, set by _set_histogram() */
    double *bounds;
    Py_ssize_t nbounds;
    double *fractions;
    Py_ssize_t nfractions;
    int native;
    int schema;
    Py_ssize_t overflow;
    double zero;
} MonitorBase;

typedef struct {
    PyObject_HEAD
    PyObject *monitor;
    PyObject *environ;
    PyObject *start_response;
    PyObject *write;
    PyObject *body;
    PyObject *iter;
    PyObject *request_id;
    PyObject *error;
    PyObject *writer;
    PyObject *lock;
    PyObject *trace_id;
    PyObject *token_tid;
    PyObject *token_rid;
    PyObject *ttfb;
    double started;
    long status;
    long long nbytes;
    char counted;
    char exhausted;
    char iterating;
    char finished;
    char done; /* the body iterator ended (or raised) */
} Call;

static PyTypeObject MonitorBaseType;
static PyTypeObject CallType;

static Py_ssize_t
native_index(MonitorBase *m, double v)
{
    if (!(v < INFINITY))
        return m->overflow;
    int exp;
    double frac = frexp(v, &exp);
    if (m->schema > 0) {
        /* bisect_left: a value equal to a boundary belongs to the bucket below */
        Py_ssize_t lo = 0, hi = m->nfractions;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (m->fractions[mid] < frac)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo + (Py_ssize_t)exp * m->nfractions - m->nfractions;
    }
    int shift = -m->schema;
    if (frac == 0.5)
        exp -= 1;
    Py_ssize_t i = (Py_ssize_t)exp + ((Py_ssize_t)1 << shift) - 1;
    /* floor division by 2**shift, as Python's >> does for negative numbers */
    return i >= 0 ? i >> shift : -((-i + ((Py_ssize_t)1 << shift) - 1) >> shift);
}

static Py_ssize_t
long_item(PyObject *tuple, Py_ssize_t i)
{
    return PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
}

/* One finished request into the store: Monitor.record() for the fast case. */
static int
record(MonitorBase *m, PyObject *w, PyObject *method, PyObject *route, long status,
       double latency_ms)
{
    int rc = -1;
    PyObject *code = NULL, *key = NULL, *slots = NULL, *q = NULL, *bkey = NULL, *bobj = NULL;
    code = PyLong_FromLong(status);
    if (code == NULL)
        goto done;
    key = PyTuple_Pack(3, method, route, code);
    if (key == NULL || m->cache == NULL || !PyDict_CheckExact(m->cache))
        goto done;
    slots = PyDict_GetItemWithError(m->cache, key);
    if (slots != NULL)
        Py_INCREF(slots);
    else if (PyErr_Occurred())
        goto done;
    else if ((slots = PyObject_CallMethodObjArgs((PyObject *)m, s_slots, w, key, NULL)) == NULL)
        goto done;
    if (!PyTuple_CheckExact(slots) || PyTuple_GET_SIZE(slots) != 3) {
        PyErr_SetString(PyExc_TypeError, "Monitor._slots must return 3 ints");
        goto done;
    }
    Py_ssize_t req = long_item(slots, 0), err = long_item(slots, 1), hist = long_item(slots, 2);
    if (PyErr_Occurred())
        goto done;
    Py_ssize_t lo = 0, hi = m->nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (m->bounds[mid] < latency_ms)
            lo = mid + 1;
        else
            hi = mid;
    }
    Py_ssize_t bucket = lo, block = -1;
    if (m->native && latency_ms > m->zero) {
        Py_ssize_t idx = native_index(m, latency_ms);
        Py_ssize_t first = idx >= 0 ? idx / NATIVE_BLOCK : -((-idx + NATIVE_BLOCK - 1) / NATIVE_BLOCK);
        PyObject *blocks = PyObject_GetAttr(w, s_blocks);
        if (blocks == NULL)
            goto done;
        bkey = Py_BuildValue("(nin)", hist, 1, first);
        if (bkey == NULL) {
            Py_DECREF(blocks);
            goto done;
        }
        bobj = PyDict_CheckExact(blocks) ? PyDict_GetItemWithError(blocks, bkey) : NULL;
        Py_XINCREF(bobj);
        Py_DECREF(blocks);
        if (bobj == NULL) {
            if (PyErr_Occurred())
                goto done;
            bobj = PyObject_CallMethod(w, "block_slot", "nin", hist, 1, first);
            if (bobj == NULL)
                goto done;
        }
        block = PyLong_AsSsize_t(bobj);
        if (block == -1 && PyErr_Occurred())
            goto done;
        block += idx - first * NATIVE_BLOCK;
    }
    q = PyObject_GetAttr(w, s_q);
    if (q == NULL)
        goto done;
    Py_buffer view;
    if (PyObject_GetBuffer(q, &view, PyBUF_WRITABLE) < 0)
        goto done;
    Py_ssize_t n = view.len / 8, inprog = m->inprog_slot;
    Py_ssize_t target = block >= 0 ? block : hist + 1;
    if (req < 0 || req >= n || hist < 0 || hist + 2 + bucket >= n || err >= n || target >= n ||
        inprog < 0 || inprog >= n) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "sfmon: store slot out of range");
        goto done;
    }
    int64_t *s = (int64_t *)view.buf;
    s[req] += VALUE_SCALE;
    if (err >= 0)
        s[err] += VALUE_SCALE;
    s[hist] += (int64_t)llrint(latency_ms * VALUE_SCALE); /* round(): half to even */
    s[hist + 2 + bucket] += 1;
    if (block >= 0 || m->native)
        s[target] += 1;
    ((double *)view.buf)[inprog] -= 1.0;
    PyBuffer_Release(&view);
    rc = 0;
done:
    Py_XDECREF(code);
    Py_XDECREF(key);
    Py_XDECREF(slots);
    Py_XDECREF(q);
    Py_XDECREF(bkey);
    Py_XDECREF(bobj);
    return rc;
}

/* Hand the current error to a Python reporter, fn(exc) or fn(first, exc), and drop it:
 * metrics and sinks never fail a request. */
static void
report_error(PyObject *fn, PyObject *first)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject *exc = v ? v : Py_None;
    PyObject *r = first ? PyObject_CallFunctionObjArgs(fn, first, exc, NULL)
                        : PyObject_CallOneArg(fn, exc);
    if (r == NULL)
        PyErr_WriteUnraisable(fn);
    Py_XDECREF(r);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
}

static Call *
call_create(PyObject *monitor, PyObject *environ, PyObject *start_response, PyObject *rid,
            double started, int counted)
{
    Call *c = PyObject_GC_New(Call, &CallType);
    if (c == NULL)
        return NULL;
    c->monitor = Py_NewRef(monitor);
    c->environ = Py_NewRef(environ);
    c->start_response = Py_NewRef(start_response);
    c->request_id = Py_NewRef(rid);
    c->write = c->body = c->iter = c->error = c->writer = c->lock = NULL;
    c->trace_id = c->token_tid = c->ttfb = NULL;
    c->started = started;
    c->status = 0;
    c->nbytes = 0;
    c->counted = (char)counted;
    c->exhausted = c->iterating = c->finished = c->done = 0;
    c->token_rid = PyContextVar_Set(g_rid_var, rid);
    PyObject_GC_Track(c);
    if (c->token_rid == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    return c;
}

static PyObject *
monitor_call(MonitorBase *self, PyObject *args, PyObject *kwds)
{
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)
        goto slow;
    if (!self->fast || PyTuple_GET_SIZE(args) != 2 || g_finish == NULL || self->app == NULL)
        goto slow;
    PyObject *environ = PyTuple_GET_ITEM(args, 0);
    PyObject *start_response = PyTuple_GET_ITEM(args, 1);
    if (!PyDict_CheckExact(environ))
        goto slow;
    PyObject *v = PyDict_GetItemWithError(environ, k_monitor);
    if (v != NULL || PyErr_Occurred())
        goto slow_clear;
    v = PyDict_GetItemWithError(environ, k_path_info);
    if (v == NULL || !PyUnicode_CheckExact(v) || self->prefix == NULL)
        goto slow_clear;
    int match = PyUnicode_Tailmatch(v, self->prefix, 0, PY_SSIZE_T_MAX, -1);
    if (match != 0)
        goto slow_clear;
    v = PyDict_GetItemWithError(environ, k_multithread);
    if (v == NULL || PyObject_IsTrue(v) != 0)
        goto slow_clear;
    PyObject *tp = PyDict_GetItemWithError(environ, k_traceparent);
    if (tp == NULL && PyErr_Occurred())
        goto slow_clear;
    PyObject *inbound = NULL;
    if (self->header_env != NULL) {
        inbound = PyDict_GetItemWithError(environ, self->header_env);
        if (inbound != NULL && !rid_ok(inbound))
            goto slow_clear;
        if (inbound == NULL && PyErr_Occurred())
            goto slow_clear;
    }
    PyObject *w = PyDict_GetItemWithError(g_store_dict, s_writer);
    if (w == NULL || w == Py_None || w != self->writer)
        goto slow_clear;
    double started = now();
    PyObject *check = PyObject_GetAttr(w, s_check_at);
    if (check == NULL)
        goto slow_clear;
    double check_at = PyFloat_AsDouble(check);
    Py_DECREF(check);
    if (check_at == -1.0 && PyErr_Occurred())
        goto slow_clear;
    if (started > check_at)
        goto slow;

    PyObject *trace_id = NULL;
    if (tp != NULL && traceparent(tp, &trace_id) < 0)
        goto slow_clear;

    /* The fast path from here on: Monitor._call_py() for this case. */
    n_fast_calls++;
    PyObject *rid = inbound != NULL ? Py_NewRef(inbound) : new_rid();
    if (rid == NULL) {
        Py_XDECREF(trace_id);
        return NULL;
    }
    if (PyDict_SetItem(environ, k_monitor, (PyObject *)self) < 0 ||
        PyDict_SetItem(environ, k_request_id, rid) < 0) {
        Py_DECREF(rid);
        Py_XDECREF(trace_id);
        return NULL;
    }
    Call *call = call_create((PyObject *)self, environ, start_response, rid, started, 1);
    Py_DECREF(rid);
    if (call == NULL) {
        Py_XDECREF(trace_id);
        return NULL;
    }
    if (trace_id != NULL) {
        call->trace_id = trace_id; /* the reference moves to the call */
        call->token_tid = PyContextVar_Set(g_tid_var, trace_id);
        if (call->token_tid == NULL) {
            Py_DECREF(call);
            return NULL;
        }
    }
    PyObject *q = PyObject_GetAttr(w, s_q);
    Py_buffer view;
    if (q != NULL && PyObject_GetBuffer(q, &view, PyBUF_WRITABLE) == 0) {
        if (self->inprog_slot >= 0 && self->inprog_slot < view.len / 8) {
            ((double *)view.buf)[self->inprog_slot] += 1.0;
            call->writer = Py_NewRef(w);
        }
        PyBuffer_Release(&view);
    }
    else
        report_error(g_store_failure, NULL);
    Py_XDECREF(q);
    PyObject *cargs[2] = {environ, (PyObject *)call};
    PyObject *body = PyObject_Vectorcall(self->app, cargs, 2, NULL);
    if (body == NULL) {
        PyObject *info = exc_info_of_current();
        if (info != NULL) {
            PyObject *t, *val, *tb;
            Py_XSETREF(call->error, info);
            PyErr_Fetch(&t, &val, &tb);
            PyObject *r = PyObject_CallOneArg(g_finish, (PyObject *)call);
            if (r == NULL)
                PyErr_WriteUnraisable(g_finish);
            Py_XDECREF(r);
            PyErr_Restore(t, val, tb);
        }
        Py_DECREF(call);
        return NULL;
    }
    call->body = body;
    return (PyObject *)call;

slow_clear:
    PyErr_Clear();
slow:;
    PyObject *meth = PyObject_GetAttr((PyObject *)self, s_call_py);
    if (meth == NULL)
        return NULL;
    PyObject *r = PyObject_Call(meth, args, kwds);
    Py_DECREF(meth);
    return r;
}

static double *
floats_of(PyObject *seq, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of floats");
    if (fast == NULL)
        return NULL;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    double *out = PyMem_Malloc(sizeof(double) * (len ? len : 1));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    *n = len;
    return out;
}

static PyObject *
monitor_set_histogram(MonitorBase *self, PyObject *args)
{
    PyObject *bounds, *fractions;
    int native, schema;
    Py_ssize_t overflow;
    double zero;
    if (!PyArg_ParseTuple(args, "OpOind:_set_histogram", &bounds, &native, &fractions, &schema,
                          &overflow, &zero))
        return NULL;
    Py_ssize_t nb = 0, nf = 0;
    double *b = floats_of(bounds, &nb);
    if (b == NULL)
        return NULL;
    double *f = floats_of(fractions, &nf);
    if (f == NULL) {
        PyMem_Free(b);
        return NULL;
    }
    if (nb < 1 || !isinf(b[nb - 1]) || (native && schema > 0 && nf != ((Py_ssize_t)1 << schema)) ||
        schema < -4 || schema > 8) {
        PyMem_Free(b);
        PyMem_Free(f);
        PyErr_SetString(PyExc_ValueError, "inconsistent histogram layout");
        return NULL;
    }
    PyMem_Free(self->bounds);
    PyMem_Free(self->fractions);
    self->bounds = b;
    self->nbounds = nb;
    self->fractions = f;
    self->nfractions = nf;
    self->native = native;
    self->schema = schema;
    self->overflow = overflow;
    self->zero = zero;
    Py_RETURN_NONE;
}

static PyObject *
monitor_native_index(MonitorBase *self, PyObject *arg)
{
    double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred())
        return NULL;
    if (!self->native || !(v > 0)) {
        PyErr_SetString(PyExc_ValueError, "needs native buckets and a value > 0");
        return NULL;
    }
    return PyLong_FromSsize_t(native_index(self, v));
}

static int
monitor_traverse(MonitorBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->writer);
    Py_VISIT(self->cache);
    Py_VISIT(self->sinks);
    return 0;
}

static int
monitor_clear(MonitorBase *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->header);
    Py_CLEAR(self->header_lower);
    Py_CLEAR(self->header_env);
    Py_CLEAR(self->writer);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->sinks);
    return 0;
}

static void
monitor_dealloc(MonitorBase *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    monitor_clear(self);
    PyMem_Free(self->bounds);
    PyMem_Free(self->fractions);
    tp->tp_free((PyObject *)self);
}

static PyMemberDef monitor_members[] = {
    {"app", T_OBJECT, offsetof(MonitorBase, app), 0, NULL},
    {"_prefix", T_OBJECT, offsetof(MonitorBase, prefix), 0, NULL},
    {"_header", T_OBJECT, offsetof(MonitorBase, header), 0, NULL},
    {"_header_lower", T_OBJECT, offsetof(MonitorBase, header_lower), 0, NULL},
    {"_header_env", T_OBJECT, offsetof(MonitorBase, header_env), 0, NULL},
    {"_writer", T_OBJECT, offsetof(MonitorBase, writer), 0, NULL},
    {"_cache", T_OBJECT, offsetof(MonitorBase, cache), 0, NULL},
    {"sinks", T_OBJECT, offsetof(MonitorBase, sinks), 0, NULL},
    {"_inprog_slot", T_PYSSIZET, offsetof(MonitorBase, inprog_slot), 0, NULL},
    {"_fast", T_BOOL, offsetof(MonitorBase, fast), 0, NULL},
    {NULL},
};

static PyMethodDef monitor_methods[] = {
    {"_set_histogram", (PyCFunction)monitor_set_histogram, METH_VARARGS,
     "_set_histogram(bounds, native, fractions, schema, overflow, zero): the latency layout"},
    {"_native_index", (PyCFunction)monitor_native_index, METH_O,
     "_native_index(v): the native bucket index of v > 0 (for tests)"},
    {NULL},
};

static PyObject *
monitor_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    MonitorBase *self = (MonitorBase *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->inprog_slot = -1;
    return (PyObject *)self;
}

static PyTypeObject MonitorBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfmon._speedups.MonitorBase",
    .tp_basicsize = sizeof(MonitorBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C part of sfmon.Monitor: its __call__ for the common case.",
    .tp_new = monitor_new,
    .tp_call = (ternaryfunc)monitor_call,
    .tp_traverse = (traverseproc)monitor_traverse,
    .tp_clear = (inquiry)monitor_clear,
    .tp_dealloc = (destructor)monitor_dealloc,
    .tp_members = monitor_members,
    .tp_methods = monitor_methods,
};

/* -- one request in flight ---------------------------------------------------------- */

static int
call_traverse(Call *c, visitproc visit, void *arg)
{
    Py_VISIT(c->monitor);
    Py_VISIT(c->environ);
    Py_VISIT(c->start_response);
    Py_VISIT(c->write);
    Py_VISIT(c->body);
    Py_VISIT(c->iter);
    Py_VISIT(c->request_id);
    Py_VISIT(c->error);
    Py_VISIT(c->writer);
    Py_VISIT(c->lock);
    Py_VISIT(c->trace_id);
    Py_VISIT(c->token_tid);
    Py_VISIT(c->token_rid);
    Py_VISIT(c->ttfb);
    return 0;
}

static int
call_clear(Call *c)
{
    Py_CLEAR(c->monitor);
    Py_CLEAR(c->environ);
    Py_CLEAR(c->start_response);
    Py_CLEAR(c->write);
    Py_CLEAR(c->body);
    Py_CLEAR(c->iter);
    Py_CLEAR(c->request_id);
    Py_CLEAR(c->error);
    Py_CLEAR(c->writer);
    Py_CLEAR(c->lock);
    Py_CLEAR(c->trace_id);
    Py_CLEAR(c->token_tid);
    Py_CLEAR(c->token_rid);
    Py_CLEAR(c->ttfb);
    return 0;
}

static void
call_dealloc(Call *c)
{
    PyObject_GC_UnTrack(c);
    call_clear(c);
    PyObject_GC_Del(c);
}

static PyObject *
call_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *monitor, *environ, *start_response, *rid;
    double started;
    int counted;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Call takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOdp:Call", &monitor, &environ, &start_response, &rid,
                          &started, &counted))
        return NULL;
    if (g_rid_var == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sfmon._speedups.setup() was not called");
        return NULL;
    }
    return (PyObject *)call_create(monitor, environ, start_response, rid, started, counted);
}

static int
ascii_ieq(PyObject *name, PyObject *lower)
{
    const Py_UCS1 *a = PyUnicode_1BYTE_DATA(name), *b = PyUnicode_1BYTE_DATA(lower);
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS1 c = a[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != b[i])
            return 0;
    }
    return 1;
}

static PyObject *
call_start_response(Call *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"status", "headers", "exc_info", NULL};
    PyObject *status, *headers, *exc_info = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:start_response", kwlist, &status,
                                     &headers, &exc_info))
        return NULL;
    MonitorBase *m = (MonitorBase *)self->monitor;
    PyObject *code = NULL;
    if (PyUnicode_CheckExact(status)) {
        code = PyDict_GetItemWithError(g_status_codes, status);
        Py_XINCREF(code);
    }
    if (code == NULL) {
        PyErr_Clear();
        code = PyObject_CallOneArg(g_status_code, status);
        if (code == NULL)
            return NULL;
    }
    self->status = PyLong_AsLong(code);
    Py_DECREF(code);
    if (self->status == -1 && PyErr_Occurred())
        return NULL;

    /* Exactly one X-Request-Id, ours; the app's list is never mutated. */
    PyObject *lower = m->header_lower, *fixed = NULL;
    if (PyList_CheckExact(headers) && lower != NULL && PyUnicode_IS_ASCII(lower) &&
        m->header != NULL && self->request_id != NULL) {
        Py_ssize_t n = PyList_GET_SIZE(headers), size = PyUnicode_GET_LENGTH(lower);
        int plain = 1;
        for (Py_ssize_t i = 0; i < n && plain; i++) {
            PyObject *h = PyList_GET_ITEM(headers, i);
            if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2) {
                plain = 0;
                break;
            }
            PyObject *name = PyTuple_GET_ITEM(h, 0);
            if (!PyUnicode_CheckExact(name))
                plain = 0;
            else if (PyUnicode_GET_LENGTH(name) == size &&
                     (!PyUnicode_IS_ASCII(name) || ascii_ieq(name, lower)))
                plain = 0;
        }
        if (plain) {
            PyObject *ours = PyTuple_Pack(2, m->header, self->request_id);
            if (ours == NULL)
                return NULL;
            fixed = PyList_New(n + 1);
            if (fixed == NULL) {
                Py_DECREF(ours);
                return NULL;
            }
            for (Py_ssize_t i = 0; i < n; i++)
                PyList_SET_ITEM(fixed, i, Py_NewRef(PyList_GET_ITEM(headers, i)));
            PyList_SET_ITEM(fixed, n, ours);
        }
    }
    if (fixed == NULL) {
        fixed = PyObject_CallFunctionObjArgs(g_fix_headers, headers, lower ? lower : Py_None,
                                             m->header ? m->header : Py_None,
                                             self->request_id ? self->request_id : Py_None,
                                             NULL);
        if (fixed == NULL)
            return NULL;
    }
    PyObject *w = PyObject_CallFunctionObjArgs(self->start_response, status, fixed, exc_info,
                                               NULL);
    Py_DECREF(fixed);
    if (w == NULL)
        return NULL;
    Py_XSETREF(self->write, w);
    return PyObject_GetAttr((PyObject *)self, s_write);
}

static void
add_len(Call *self, PyObject *chunk)
{
    if (PyBytes_CheckExact(chunk)) {
        self->nbytes += PyBytes_GET_SIZE(chunk);
        return;
    }
    Py_ssize_t n = PyObject_Size(chunk);
    if (n >= 0)
        self->nbytes += n;
    else if (PyErr_ExceptionMatches(PyExc_TypeError))
        PyErr_Clear();
}

static PyObject *
call_write(Call *self, PyObject *data)
{
    if (ISNONE(self->ttfb)) {
        int truth = PyObject_IsTrue(data);
        if (truth < 0)
            return NULL;
        if (truth) {
            PyObject *t = PyFloat_FromDouble(now());
            if (t == NULL)
                return NULL;
            Py_XSETREF(self->ttfb, t);
        }
    }
    add_len(self, data);
    if (PyErr_Occurred())
        return NULL;
    if (self->write == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "write() before start_response()");
        return NULL;
    }
    return PyObject_CallOneArg(self->write, data);
}

static PyObject *
call_iter(Call *self)
{
    PyObject *body = self->body ? self->body : Py_None;
    if (PyList_CheckExact(body)) {
        Py_ssize_t n = PyList_GET_SIZE(body);
        long long total = 0;
        int ok = 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyList_GET_ITEM(body, i);
            if (PyBytes_CheckExact(item)) {
                total += PyBytes_GET_SIZE(item);
                continue;
            }
            Py_INCREF(item);
            Py_ssize_t len = PyObject_Size(item);
            Py_DECREF(item);
            if (len < 0) {
                if (!PyErr_ExceptionMatches(PyExc_TypeError))
                    return NULL;
                PyErr_Clear();
                ok = 0;
                break;
            }
            total += len;
        }
        if (ok)
            self->nbytes += total;
        self->exhausted = 1;
        return PyObject_GetIter(body);
    }
    return Py_NewRef(self);
}

static void
keep_error(Call *self)
{
    PyObject *info = exc_info_of_current();
    if (info != NULL)
        Py_XSETREF(self->error, info);
}

static PyObject *
call_iternext(Call *self)
{
    if (self->done)
        return NULL;
    if (!self->iterating) {
        self->iterating = 1;
        self->iter = PyObject_GetIter(self->body ? self->body : Py_None);
        if (self->iter == NULL) {
            self->done = 1;
            keep_error(self);
            return NULL;
        }
    }
    PyObject *chunk = PyIter_Next(self->iter);
    if (chunk != NULL) {
        if (ISNONE(self->ttfb) && PyObject_IsTrue(chunk) == 1) {
            PyObject *t = PyFloat_FromDouble(now());
            if (t != NULL)
                Py_XSETREF(self->ttfb, t);
        }
        add_len(self, chunk);
        if (PyErr_Occurred())
            PyErr_Clear();
        return chunk;
    }
    self->done = 1;
    Py_CLEAR(self->iter);
    if (PyErr_Occurred())
        keep_error(self);
    else
        self->exhausted = 1;
    return NULL;
}

/* -- the record handed to the sinks ------------------------------------------------ */

#define RECORD_FIELDS 15
static const char *record_names[RECORD_FIELDS + 1] = {
    "request_id",   "trace_id",   "method",      "method_label", "path",
    "route",        "status",     "content_length", "latency_ms", "ttfb_ms",
    "started_at",   "user_id",    "client_addr", "exception",    "exc_info", NULL};

typedef struct {
    PyObject_HEAD
    PyObject *f[RECORD_FIELDS];
} RecordBase;

static PyObject *
record_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *v[RECORD_FIELDS];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOOOOOO:RequestRecord",
                                     (char **)record_names, &v[0], &v[1], &v[2], &v[3], &v[4],
                                     &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11], &v[12],
                                     &v[13], &v[14]))
        return NULL;
    RecordBase *r = (RecordBase *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    for (int i = 0; i < RECORD_FIELDS; i++)
        r->f[i] = Py_NewRef(v[i]);
    return (PyObject *)r;
}

static int
record_traverse(RecordBase *r, visitproc visit, void *arg)
{
    for (int i = 0; i < RECORD_FIELDS; i++)
        Py_VISIT(r->f[i]);
    return 0;
}

static int
record_clear(RecordBase *r)
{
    for (int i = 0; i < RECORD_FIELDS; i++)
        Py_CLEAR(r->f[i]);
    return 0;
}

static void
record_dealloc(RecordBase *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    PyObject_GC_UnTrack(r);
    record_clear(r);
    tp->tp_free((PyObject *)r);
}

#define RECORD_MEMBER(i) {(char *)0, T_OBJECT, offsetof(RecordBase, f) + (i) * sizeof(PyObject *), 0, NULL}
static PyMemberDef record_members[RECORD_FIELDS + 1] = {
    RECORD_MEMBER(0),  RECORD_MEMBER(1),  RECORD_MEMBER(2),  RECORD_MEMBER(3),
    RECORD_MEMBER(4),  RECORD_MEMBER(5),  RECORD_MEMBER(6),  RECORD_MEMBER(7),
    RECORD_MEMBER(8),  RECORD_MEMBER(9),  RECORD_MEMBER(10), RECORD_MEMBER(11),
    RECORD_MEMBER(12), RECORD_MEMBER(13), RECORD_MEMBER(14), {NULL},
};

static PyTypeObject RecordBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfmon._speedups.RecordBase",
    .tp_basicsize = sizeof(RecordBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of sfmon.RequestRecord, in C.",
    .tp_new = record_new,
    .tp_traverse = (traverseproc)record_traverse,
    .tp_clear = (inquiry)record_clear,
    .tp_dealloc = (destructor)record_dealloc,
    .tp_members = record_members,
};

static double
wall_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* middleware._sinks for the fast case: build the record, call each sink. Returns -1
 * with an error set only for a BaseException that is not an Exception (as Python's
 * "except Exception" lets through); returns 1 when the case is not plain (Python does it). */
static int
to_sinks(Call *self, PyObject *sinks, PyObject *method, PyObject *label, PyObject *route,
         double latency_ms)
{
    PyObject *env = self->environ;
    PyObject *user = PyDict_GetItemWithError(env, k_user_id);
    if (user == NULL && PyErr_Occurred())
        return 1;
    if (user != NULL) {
        int truth = PyObject_IsTrue(user);
        if (truth < 0)
            return 1;
        if (!truth)
            user = NULL;
    }
    if (user == NULL) {
        user = PyDict_GetItemWithError(env, k_remote_user);
        if (user == NULL && PyErr_Occurred())
            return 1;
    }
    if (user != NULL && user != Py_None && !PyUnicode_CheckExact(user))
        return 1;
    PyObject *script = PyDict_GetItemWithError(env, k_script_name);
    PyObject *pinfo = PyDict_GetItemWithError(env, k_path_info);
    if (PyErr_Occurred())
        return 1;
    script = script ? script : s_empty;
    pinfo = pinfo ? pinfo : s_empty;
    if (!PyUnicode_CheckExact(script) || !PyUnicode_CheckExact(pinfo))
        return 1;
    PyObject *addr = PyDict_GetItemWithError(env, k_remote_addr);
    if (addr == NULL && PyErr_Occurred())
        return 1;
    PyObject *v[RECORD_FIELDS] = {NULL};
    int rc = -1;
    v[0] = Py_NewRef(self->request_id ? self->request_id : Py_None);
    v[1] = Py_NewRef(ISNONE(self->trace_id) ? Py_None : self->trace_id);
    v[2] = Py_NewRef(method);
    v[3] = Py_NewRef(label);
    v[4] = PyUnicode_GET_LENGTH(script) ? PyUnicode_Concat(script, pinfo) : Py_NewRef(pinfo);
    v[5] = Py_NewRef(route);
    v[6] = PyLong_FromLong(self->status);
    v[7] = PyLong_FromLongLong(self->nbytes);
    v[8] = PyFloat_FromDouble(latency_ms);
    if (ISNONE(self->ttfb))
        v[9] = Py_NewRef(Py_None);
    else {
        double t = PyFloat_AsDouble(self->ttfb);
        v[9] = (t == -1.0 && PyErr_Occurred()) ? NULL
                                                : PyFloat_FromDouble((t - self->started) * 1000.0);
    }
    v[10] = PyFloat_FromDouble(wall_clock() - latency_ms / 1000.0);
    v[11] = Py_NewRef(user ? user : Py_None);
    v[12] = Py_NewRef(addr ? addr : Py_None);
    v[13] = Py_NewRef(Py_None);
    v[14] = Py_NewRef(ISNONE(self->error) ? Py_None : self->error);
    for (int i = 0; i < RECORD_FIELDS; i++)
        if (v[i] == NULL)
            goto done;
    PyObject *record = PyObject_Vectorcall(g_record_type, v, RECORD_FIELDS, NULL);
    if (record == NULL)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(sinks);
    rc = 0;
    for (Py_ssize_t i = 0; i < n && i < PyList_GET_SIZE(sinks); i++) {
        PyObject *sink = Py_NewRef(PyList_GET_ITEM(sinks, i));
        PyObject *r = PyObject_CallOneArg(sink, record);
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(sink);
                rc = -1;
                break;
            }
            report_error(g_sink_failed, sink);
        }
        Py_XDECREF(r);
        Py_DECREF(sink);
    }
    Py_DECREF(record);
done:
    for (int i = 0; i < RECORD_FIELDS; i++)
        Py_XDECREF(v[i]);
    if (rc == -1 && !PyErr_Occurred())
        rc = 1; /* a conversion failed without an error: let Python do it */
    if (rc == -1 && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* building the record failed: report like a failing sink, never raise */
        report_error(g_sink_failed, sinks);
        rc = 0;
    }
    return rc;
}

/* The common end of a request, in C; anything else goes to middleware._finish. */
static int
finish(Call *self)
{
    if (self->finished)
        return 0;
    MonitorBase *m = (MonitorBase *)self->monitor;
    PyObject *environ = self->environ, *route = NULL, *method = NULL;
    if (!ISNONE(self->error) || self->status <= 0 || self->status >= 400 ||
        (self->iterating && !self->exhausted) || !self->counted || !ISNONE(self->lock) ||
        self->writer == NULL || self->writer != m->writer ||
        environ == NULL || !PyDict_CheckExact(environ))
        goto slow;
    route = PyDict_GetItemWithError(environ, k_route);
    if (route == NULL || !PyUnicode_CheckExact(route) || PyUnicode_GET_LENGTH(route) == 0 ||
        PyUnicode_GET_LENGTH(route) > MAX_ROUTE)
        goto slow_clear;
    method = PyDict_GetItemWithError(environ, k_method);
    if (method == NULL) {
        if (PyErr_Occurred())
            goto slow_clear;
        method = s_empty;
    }
    if (!PyUnicode_CheckExact(method))
        goto slow;
    Py_INCREF(route);
    Py_INCREF(method);
    self->finished = 1;
    n_fast_finishes++;
    double latency_ms = (now() - self->started) * 1000.0;
    int known = PySet_Contains(g_methods, method);
    PyObject *label = known == 1 ? method : g_other_method;
    PyErr_Clear();
    if (record(m, self->writer, label, route, self->status, latency_ms) < 0)
        report_error(g_store_failure, NULL);
    PyObject *t = NULL, *e = NULL, *tb = NULL; /* a BaseException from a sink, re-raised */
    if (m->sinks != NULL && PyList_CheckExact(m->sinks) && PyList_GET_SIZE(m->sinks) > 0) {
        int done = to_sinks(self, m->sinks, method, label, route, latency_ms);
        if (done < 0)
            PyErr_Fetch(&t, &e, &tb);
        else if (done > 0) {
            PyObject *st = PyLong_FromLong(self->status), *ms = PyFloat_FromDouble(latency_ms);
            PyObject *r = NULL;
            if (st != NULL && ms != NULL)
                r = PyObject_CallFunctionObjArgs(g_sinks, (PyObject *)self, method, label, route,
                                                 st, ms, Py_None, NULL);
            if (r == NULL)
                PyErr_Fetch(&t, &e, &tb);
            Py_XDECREF(r);
            Py_XDECREF(st);
            Py_XDECREF(ms);
        }
    }
    Py_DECREF(route);
    Py_DECREF(method);
    if (self->token_rid != NULL) {
        if (PyContextVar_Reset(g_rid_var, self->token_rid) < 0) {
            /* closed from another context (a different thread or task) */
            PyErr_Clear();
            PyObject *tok = PyContextVar_Set(g_rid_var, Py_None);
            Py_XDECREF(tok);
            PyErr_Clear();
        }
    }
    if (!ISNONE(self->token_tid)) {
        if (PyContextVar_Reset(g_tid_var, self->token_tid) < 0) {
            PyErr_Clear();
            PyObject *tok = PyContextVar_Set(g_tid_var, Py_None);
            Py_XDECREF(tok);
            PyErr_Clear();
        }
    }
    Py_CLEAR(self->environ);
    if (t != NULL) {
        PyErr_Restore(t, e, tb);
        return -1;
    }
    return 0;

slow_clear:
    PyErr_Clear();
slow:;
    PyObject *r = PyObject_CallOneArg(g_finish, (PyObject *)self);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
call_finish(Call *self, PyObject *unused)
{
    if (finish(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
call_close(Call *self, PyObject *unused)
{
    PyObject *body = self->body, *close = NULL;
    int failed = 0;
    if (body != NULL && !PyList_CheckExact(body) && !PyTuple_CheckExact(body)) {
#if PY_VERSION_HEX >= 0x030D0000
        int found = PyObject_GetOptionalAttr(body, s_close, &close);
#else
        int found = _PyObject_LookupAttr(body, s_close, &close);
#endif
        PyObject *r = NULL;
        if (found > 0) {
            r = PyObject_CallNoArgs(close);
            Py_DECREF(close);
        }
        if (found < 0 || (found > 0 && r == NULL)) {
            failed = 1;
            if (ISNONE(self->error))
                keep_error(self);
        }
        Py_XDECREF(r);
    }
    if (failed) {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (finish(self) < 0)
            PyErr_WriteUnraisable(g_finish);
        PyErr_Restore(t, v, tb);
        return NULL;
    }
    if (finish(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMemberDef call_members[] = {
    {"monitor", T_OBJECT, offsetof(Call, monitor), 0, NULL},
    {"environ", T_OBJECT, offsetof(Call, environ), 0, NULL},
    {"_start_response", T_OBJECT, offsetof(Call, start_response), 0, NULL},
    {"_write", T_OBJECT, offsetof(Call, write), 0, NULL},
    {"body", T_OBJECT, offsetof(Call, body), 0, NULL},
    {"request_id", T_OBJECT, offsetof(Call, request_id), 0, NULL},
    {"error", T_OBJECT, offsetof(Call, error), 0, NULL},
    {"writer", T_OBJECT, offsetof(Call, writer), 0, NULL},
    {"lock", T_OBJECT, offsetof(Call, lock), 0, NULL},
    {"trace_id", T_OBJECT, offsetof(Call, trace_id), 0, NULL},
    {"token_tid", T_OBJECT, offsetof(Call, token_tid), 0, NULL},
    {"token_rid", T_OBJECT, offsetof(Call, token_rid), 0, NULL},
    {"ttfb", T_OBJECT, offsetof(Call, ttfb), 0, NULL},
    {"started", T_DOUBLE, offsetof(Call, started), 0, NULL},
    {"status", T_LONG, offsetof(Call, status), 0, NULL},
    {"nbytes", T_LONGLONG, offsetof(Call, nbytes), 0, NULL},
    {"counted", T_BOOL, offsetof(Call, counted), 0, NULL},
    {"exhausted", T_BOOL, offsetof(Call, exhausted), 0, NULL},
    {"iterating", T_BOOL, offsetof(Call, iterating), 0, NULL},
    {"finished", T_BOOL, offsetof(Call, finished), 0, NULL},
    {NULL},
};

static PyMethodDef call_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))call_start_response,
     METH_VARARGS | METH_KEYWORDS, "The start_response handed to the app."},
    {"write", (PyCFunction)call_write, METH_O, "The legacy write() callable, counted."},
    {"close", (PyCFunction)call_close, METH_NOARGS, "Close the body and end the request."},
    {"finish", (PyCFunction)call_finish, METH_NOARGS, "End the request (once)."},
    {NULL},
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sfmon._speedups.Call",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One request in flight: wraps start_response and the body; close() ends it.",
    .tp_new = call_tp_new,
    .tp_call = (ternaryfunc)call_start_response,
    .tp_traverse = (traverseproc)call_traverse,
    .tp_clear = (inquiry)call_clear,
    .tp_dealloc = (destructor)call_dealloc,
    .tp_iter = (getiterfunc)call_iter,
    .tp_iternext = (iternextfunc)call_iternext,
    .tp_members = call_members,
    .tp_methods = call_methods,
};

/* -- module ------------------------------------------------------------------------- */

static PyObject *
sp_setup(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"finish",      "sinks",    "status_code", "status_codes",
                             "fix_headers", "store_failure", "store_dict",  "request_id_var", "trace_id_var",
                             "methods",     "other_method",  "record_type", "sink_failed",
                             NULL};
    PyObject *v[13];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!OOO!OOO!UOO:setup", kwlist, &v[0], &v[1],
                                     &v[2], &PyDict_Type, &v[3], &v[4], &v[5], &PyDict_Type,
                                     &v[6], &v[7], &v[8], &PyFrozenSet_Type, &v[9], &v[10],
                                     &v[11], &v[12]))
        return NULL;
    PyObject **dst[13] = {&g_finish,       &g_sinks,      &g_status_code, &g_status_codes,
                          &g_fix_headers,  &g_store_failure, &g_store_dict, &g_rid_var,
                          &g_tid_var,      &g_methods,    &g_other_method, &g_record_type,
                          &g_sink_failed};
    for (int i = 0; i < 13; i++)
        Py_XSETREF(*dst[i], Py_NewRef(v[i]));
    Py_RETURN_NONE;
}

static PyObject *
sp_set_clock(PyObject *mod, PyObject *clock)
{
    Py_XSETREF(g_clock, clock == Py_None ? NULL : Py_NewRef(clock));
    Py_RETURN_NONE;
}

static PyObject *
sp_stats(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("{sKsK}", "calls", n_fast_calls, "finishes", n_fast_finishes);
}

static PyMethodDef module_methods[] = {
    {"set_clock", sp_set_clock, METH_O,
     "set_clock(fn or None): read the time from fn() instead of the monotonic clock (tests)."},
    {"stats", sp_stats, METH_NOARGS,
     "stats() -> {'calls': n, 'finishes': n}: requests the C path served whole, this process."},
    {"setup", (PyCFunction)(void (*)(void))sp_setup, METH_VARARGS | METH_KEYWORDS,
     "Register the Python functions the slow cases go to."},
    {"new_request_id", sp_new_request_id, METH_NOARGS,
     "A fresh id: 16 hex digits random per process, 16 a counter."},
    {"reseed", sp_reseed, METH_O, "reseed(12 random bytes): new prefix and counter start."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sfmon._speedups", "The per-request hot path of sfmon, in C.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_writer, "_writer"},
        {&s_check_at, "check_at"},
        {&s_q, "q"},
        {&s_blocks, "blocks"},
        {&s_slots, "_slots"},
        {&s_call_py, "_call_py"},
        {&s_close, "close"},
        {&s_write, "write"},
        {&k_monitor, "sfmon.monitor"},
        {&k_request_id, "sfmon.request_id"},
        {&k_path_info, "PATH_INFO"},
        {&k_multithread, "wsgi.multithread"},
        {&k_traceparent, "HTTP_TRACEPARENT"},
        {&k_route, "sfmon.route"},
        {&k_method, "REQUEST_METHOD"},
        {&s_empty, ""},
        {&k_user_id, "sfmon.user_id"},
        {&k_remote_user, "REMOTE_USER"},
        {&k_script_name, "SCRIPT_NAME"},
        {&k_remote_addr, "REMOTE_ADDR"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return NULL;
    }
    for (int i = 0; i < RECORD_FIELDS; i++)
        record_members[i].name = record_names[i];
    if (PyType_Ready(&MonitorBaseType) < 0 || PyType_Ready(&CallType) < 0 ||
        PyType_Ready(&RecordBaseType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "MonitorBase", (PyObject *)&MonitorBaseType) < 0 ||
        PyModule_AddObjectRef(m, "Call", (PyObject *)&CallType) < 0 ||
        PyModule_AddObjectRef(m, "RecordBase", (PyObject *)&RecordBaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
