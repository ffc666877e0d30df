/* engine.io._fastio: batched datagram I/O for the worker and intercept-mp hot paths.
 *
 * Theory of operation
 * -------------------
 * The Python loop hands over whole batches so the per-packet cost is one struct fill, not
 * one syscall plus an interpreter round trip:
 *
 *   send_raw_batch(fd, packets, start=0) -> (sent, errno)
 *       sendmmsg(2) of packets[start:] on an IPPROTO_RAW / IP_HDRINCL socket, each to its
 *       own IPv4 destination (bytes 16..20 of the packet, the daddr the kernel routes by).
 *       Stops at the first packet the kernel refuses: `sent` packets went out, and `errno`
 *       is the refusal of packets[start + sent] (0 when all went out).  The caller counts
 *       that packet and calls again from start + sent + 1, so every packet is either sent
 *       or counted under its own errno, as a per-packet sendto would.  A packet shorter than
 *       an IPv4 header is refused here with EINVAL (it is never handed to the kernel).
 *
 *   send_link_batch(fd, ifindex, packets, headers, start=0) -> (sent, errno)
 *       The same on an AF_PACKET socket (-o DEV): each IPv4 packet goes out on `ifindex`
 *       as one Ethernet frame, written from two pieces (no copy): the 14-byte header of
 *       its destination and the packet.  `headers` is a bytes of 18-byte records, the
 *       packet's daddr (4 bytes, network order) then its frame header; a packet whose
 *       daddr has no record is refused with EHOSTUNREACH (no next-hop MAC), one shorter
 *       than an IPv4 header with EINVAL.  Same stop-and-report contract as above.
 *
 *   send_raw_buffer(fd, buf, lengths, n, start=0) -> (sent, errno)
 *   send_link_buffer(fd, ifindex, buf, lengths, n, headers, start=0) -> (sent, errno)
 *       The same two, for packets written back to back into one buffer (a drain's send
 *       buffer, engine/io/batch.py SendBuffer): packet i is `lengths[i]` bytes (a u32
 *       buffer) after packets 0..i-1.  No Python object per packet.  `n` beyond `lengths`, or
 *       packets reaching past `buf`, raise ValueError before anything is sent.
 *
 *   recv_batch(fd, max, bufsize) -> list[bytes]
 *       recvmmsg(2) with MSG_DONTWAIT: up to `max` datagrams in one syscall (the NFQUEUE
 *       netlink socket).  Returns [] on EAGAIN; raises OSError on any other error, except
 *       that ENOBUFS is returned as the int -ENOBUFS so the caller can count the overrun.
 *
 *   parse_nfqueue(datagrams) -> list[(packet_id, payload | None)]
 *       The NFQNL_MSG_PACKET messages of netlink datagrams (intercept/sources/nfqueue.py's
 *       parse_queue_messages, which is the reference and the fallback): the packet id of
 *       NFQA_PACKET_HDR and the bytes of NFQA_PAYLOAD; other messages and broken tails are
 *       skipped.
 *
 * The syscalls run with the GIL released.  engine/io/send.py and intercept/sources/nfqueue.py
 * fall back to ctypes or plain socket calls when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define CHUNK 256 /* messages per sendmmsg/recvmmsg call (UIO_MAXIOV is 1024) */
#define RECV_MAX 1024
#define IPV4_HDR_MIN 20
#define LINK_RECORD 18 /* daddr (4) + Ethernet header (14) */
#define LINK_HDR 14

static PyObject *
send_raw_batch(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *seq;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "iO|n:send_raw_batch", &fd, &seq, &start))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "packets must be a sequence of bytes");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[CHUNK];
    struct sockaddr_in addr[CHUNK];
    Py_ssize_t i = start < 0 ? 0 : start;
    Py_ssize_t first = i;
    int err = 0;

    while (i < n && err == 0) {
        int k = 0;
        while (k < CHUNK && i + k < n) {
            PyObject *item = items[i + k];
            char *buf;
            Py_ssize_t len;
            if (PyBytes_Check(item)) {
                buf = PyBytes_AS_STRING(item);
                len = PyBytes_GET_SIZE(item);
            } else if (PyByteArray_Check(item)) {
                buf = PyByteArray_AS_STRING(item);
                len = PyByteArray_GET_SIZE(item);
            } else {
                Py_DECREF(fast);
                PyErr_SetString(PyExc_TypeError, "packets must be bytes");
                return NULL;
            }
            if (len < IPV4_HDR_MIN)
                break;
            memset(&addr[k], 0, sizeof(addr[k]));
            addr[k].sin_family = AF_INET;
            memcpy(&addr[k].sin_addr, buf + 16, 4);
            iov[k].iov_base = buf;
            iov[k].iov_len = (size_t)len;
            memset(&msgs[k], 0, sizeof(msgs[k]));
            msgs[k].msg_hdr.msg_name = &addr[k];
            msgs[k].msg_hdr.msg_namelen = sizeof(addr[k]);
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            k++;
        }
        if (k == 0) {
            err = EINVAL; /* packets[i] is shorter than an IPv4 header */
            break;
        }
        int r;
        Py_BEGIN_ALLOW_THREADS
        do {
            r = sendmmsg(fd, msgs, (unsigned int)k, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            err = errno;
        Py_END_ALLOW_THREADS
        if (r > 0)
            i += r;
        /* r < k without an error: the next call fails on packets[i] and reports why. */
    }
    Py_DECREF(fast);
    return Py_BuildValue("(ni)", i - first, err);
}

static int
packet_buffer(PyObject *item, char **buf, Py_ssize_t *len)
{
    if (PyBytes_Check(item)) {
        *buf = PyBytes_AS_STRING(item);
        *len = PyBytes_GET_SIZE(item);
    } else if (PyByteArray_Check(item)) {
        *buf = PyByteArray_AS_STRING(item);
        *len = PyByteArray_GET_SIZE(item);
    } else {
        PyErr_SetString(PyExc_TypeError, "packets must be bytes");
        return -1;
    }
    return 0;
}

static PyObject *
send_link_batch(PyObject *self, PyObject *args)
{
    int fd, ifindex;
    PyObject *seq;
    const char *table;
    Py_ssize_t table_len;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "iiOy#|n:send_link_batch", &fd, &ifindex, &seq, &table,
                          &table_len, &start))
        return NULL;
    if (table_len % LINK_RECORD != 0) {
        PyErr_SetString(PyExc_ValueError, "headers must be 18-byte records");
        return NULL;
    }
    Py_ssize_t records = table_len / LINK_RECORD;
    PyObject *fast = PySequence_Fast(seq, "packets must be a sequence of bytes");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[2 * CHUNK];
    struct sockaddr_ll addr;
    memset(&addr, 0, sizeof(addr));
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_IP);
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    Py_ssize_t i = start < 0 ? 0 : start;
    Py_ssize_t first = i;
    int err = 0;

    while (i < n && err == 0) {
        int k = 0;
        int stop = 0;
        while (k < CHUNK && i + k < n) {
            char *buf;
            Py_ssize_t len;
            if (packet_buffer(items[i + k], &buf, &len) < 0) {
                Py_DECREF(fast);
                return NULL;
            }
            if (len < IPV4_HDR_MIN) {
                stop = EINVAL;
                break;
            }
            const char *hdr = NULL;
            /* A handful of targets: a linear scan beats any hashing here. */
            for (Py_ssize_t r = 0; r < records; r++) {
                if (memcmp(table + r * LINK_RECORD, buf + 16, 4) == 0) {
                    hdr = table + r * LINK_RECORD + 4;
                    break;
                }
            }
            if (hdr == NULL) {
                stop = EHOSTUNREACH;
                break;
            }
            iov[2 * k].iov_base = (void *)hdr;
            iov[2 * k].iov_len = LINK_HDR;
            iov[2 * k + 1].iov_base = buf;
            iov[2 * k + 1].iov_len = (size_t)len;
            memset(&msgs[k], 0, sizeof(msgs[k]));
            msgs[k].msg_hdr.msg_name = &addr;
            msgs[k].msg_hdr.msg_namelen = sizeof(addr);
            msgs[k].msg_hdr.msg_iov = &iov[2 * k];
            msgs[k].msg_hdr.msg_iovlen = 2;
            k++;
        }
        if (k == 0) {
            err = stop; /* packets[i] itself is refused */
            break;
        }
        int r;
        Py_BEGIN_ALLOW_THREADS
        do {
            r = sendmmsg(fd, msgs, (unsigned int)k, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            err = errno;
        Py_END_ALLOW_THREADS
        if (r > 0)
            i += r;
        /* r < k: the next round reports packets[i]'s refusal (or the one found above). */
    }
    Py_DECREF(fast);
    return Py_BuildValue("(ni)", i - first, err);
}

/* Packet i of a send buffer: the u32 lengths, summed once into offsets by the caller. */
static int
buffer_packets(Py_buffer *buf, Py_buffer *lens, Py_ssize_t n, size_t **offsets_out)
{
    if (lens->len % 4 != 0 || n < 0 || n > lens->len / 4) {
        PyErr_SetString(PyExc_ValueError, "n is beyond the lengths buffer");
        return -1;
    }
    size_t *offsets = PyMem_Malloc(((size_t)n + 1) * sizeof(size_t));
    if (offsets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    const uint32_t *l = (const uint32_t *)lens->buf;
    size_t off = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        offsets[i] = off;
        off += l[i];
        if (off > (size_t)buf->len) {
            PyMem_Free(offsets);
            PyErr_SetString(PyExc_ValueError, "packets reach past the buffer");
            return -1;
        }
    }
    offsets[n] = off;
    *offsets_out = offsets;
    return 0;
}

static PyObject *
send_raw_buffer(PyObject *self, PyObject *args)
{
    int fd;
    Py_buffer buf, lens;
    Py_ssize_t n, start = 0;
    if (!PyArg_ParseTuple(args, "iy*y*n|n:send_raw_buffer", &fd, &buf, &lens, &n, &start))
        return NULL;
    size_t *offsets = NULL;
    if (buffer_packets(&buf, &lens, n, &offsets) < 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&lens);
        return NULL;
    }
    const uint32_t *l = (const uint32_t *)lens.buf;
    char *base = (char *)buf.buf;
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[CHUNK];
    struct sockaddr_in addr[CHUNK];
    Py_ssize_t i = start < 0 ? 0 : start;
    Py_ssize_t first = i;
    int err = 0;

    Py_BEGIN_ALLOW_THREADS
    while (i < n && err == 0) {
        int k = 0;
        while (k < CHUNK && i + k < n) {
            char *p = base + offsets[i + k];
            uint32_t len = l[i + k];
            if (len < IPV4_HDR_MIN)
                break;
            memset(&addr[k], 0, sizeof(addr[k]));
            addr[k].sin_family = AF_INET;
            memcpy(&addr[k].sin_addr, p + 16, 4);
            iov[k].iov_base = p;
            iov[k].iov_len = len;
            memset(&msgs[k], 0, sizeof(msgs[k]));
            msgs[k].msg_hdr.msg_name = &addr[k];
            msgs[k].msg_hdr.msg_namelen = sizeof(addr[k]);
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            k++;
        }
        if (k == 0) {
            err = EINVAL; /* packet i is shorter than an IPv4 header */
            break;
        }
        int r;
        do {
            r = sendmmsg(fd, msgs, (unsigned int)k, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            err = errno;
        else
            i += r;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(offsets);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&lens);
    return Py_BuildValue("(ni)", i - first, err);
}

static PyObject *
send_link_buffer(PyObject *self, PyObject *args)
{
    int fd, ifindex;
    Py_buffer buf, lens;
    const char *table;
    Py_ssize_t table_len;
    Py_ssize_t n, start = 0;
    if (!PyArg_ParseTuple(args, "iiy*y*ny#|n:send_link_buffer", &fd, &ifindex, &buf, &lens, &n,
                          &table, &table_len, &start))
        return NULL;
    size_t *offsets = NULL;
    if (table_len % LINK_RECORD != 0) {
        PyErr_SetString(PyExc_ValueError, "headers must be 18-byte records");
    } else {
        buffer_packets(&buf, &lens, n, &offsets);
    }
    if (offsets == NULL) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&lens);
        return NULL;
    }
    Py_ssize_t records = table_len / LINK_RECORD;
    const uint32_t *l = (const uint32_t *)lens.buf;
    char *base = (char *)buf.buf;
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[2 * CHUNK];
    struct sockaddr_ll addr;
    memset(&addr, 0, sizeof(addr));
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_IP);
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    Py_ssize_t i = start < 0 ? 0 : start;
    Py_ssize_t first = i;
    int err = 0;

    Py_BEGIN_ALLOW_THREADS
    while (i < n && err == 0) {
        int k = 0;
        int stop = 0;
        while (k < CHUNK && i + k < n) {
            char *p = base + offsets[i + k];
            uint32_t len = l[i + k];
            if (len < IPV4_HDR_MIN) {
                stop = EINVAL;
                break;
            }
            const char *hdr = NULL;
            for (Py_ssize_t r = 0; r < records; r++) {
                if (memcmp(table + r * LINK_RECORD, p + 16, 4) == 0) {
                    hdr = table + r * LINK_RECORD + 4;
                    break;
                }
            }
            if (hdr == NULL) {
                stop = EHOSTUNREACH;
                break;
            }
            iov[2 * k].iov_base = (void *)hdr;
            iov[2 * k].iov_len = LINK_HDR;
            iov[2 * k + 1].iov_base = p;
            iov[2 * k + 1].iov_len = len;
            memset(&msgs[k], 0, sizeof(msgs[k]));
            msgs[k].msg_hdr.msg_name = &addr;
            msgs[k].msg_hdr.msg_namelen = sizeof(addr);
            msgs[k].msg_hdr.msg_iov = &iov[2 * k];
            msgs[k].msg_hdr.msg_iovlen = 2;
            k++;
        }
        if (k == 0) {
            err = stop;
            break;
        }
        int r;
        do {
            r = sendmmsg(fd, msgs, (unsigned int)k, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            err = errno;
        else
            i += r;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(offsets);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&lens);
    return Py_BuildValue("(ni)", i - first, err);
}

static PyObject *
recv_batch(PyObject *self, PyObject *args)
{
    int fd;
    int max = 64;
    Py_ssize_t bufsize = 4096;
    if (!PyArg_ParseTuple(args, "i|in:recv_batch", &fd, &max, &bufsize))
        return NULL;
    if (max < 1)
        max = 1;
    if (max > RECV_MAX)
        max = RECV_MAX;
    if (bufsize < 1 || bufsize > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "bufsize out of range");
        return NULL;
    }
    char *pool = PyMem_Malloc((size_t)max * (size_t)bufsize);
    struct mmsghdr *msgs = PyMem_Calloc((size_t)max, sizeof(struct mmsghdr));
    struct iovec *iov = PyMem_Calloc((size_t)max, sizeof(struct iovec));
    if (pool == NULL || msgs == NULL || iov == NULL) {
        PyMem_Free(pool);
        PyMem_Free(msgs);
        PyMem_Free(iov);
        return PyErr_NoMemory();
    }
    for (int k = 0; k < max; k++) {
        iov[k].iov_base = pool + (size_t)k * (size_t)bufsize;
        iov[k].iov_len = (size_t)bufsize;
        msgs[k].msg_hdr.msg_iov = &iov[k];
        msgs[k].msg_hdr.msg_iovlen = 1;
    }
    int r, err = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        r = recvmmsg(fd, msgs, (unsigned int)max, MSG_DONTWAIT, NULL);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    PyObject *out = NULL;
    if (r < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            out = PyList_New(0);
        else if (err == ENOBUFS)
            out = PyLong_FromLong(-ENOBUFS);
        else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
    } else {
        out = PyList_New(r);
        for (int k = 0; out != NULL && k < r; k++) {
            PyObject *b = PyBytes_FromStringAndSize(iov[k].iov_base, (Py_ssize_t)msgs[k].msg_len);
            if (b == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, k, b);
        }
    }
    PyMem_Free(pool);
    PyMem_Free(msgs);
    PyMem_Free(iov);
    return out;
}

#define NLMSG_HDR 16
#define NFGEN_HDR 4
#define NFQ_PACKET_TYPE ((3 << 8) | 0) /* NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET */
#define NFQA_PACKET_HDR 1
#define NFQA_PAYLOAD 10
#define NLA_TYPE_MASK 0x3FFF

static int
parse_one(PyObject *out, const unsigned char *buf, Py_ssize_t n)
{
    Py_ssize_t pos = 0;
    while (pos + NLMSG_HDR + NFGEN_HDR <= n) {
        uint32_t mlen;
        uint16_t mtype;
        memcpy(&mlen, buf + pos, 4); /* host order, as netlink sends it */
        memcpy(&mtype, buf + pos + 4, 2);
        if (mlen < NLMSG_HDR || (Py_ssize_t)mlen > n - pos)
            return 0;
        Py_ssize_t end = pos + (Py_ssize_t)mlen;
        if (mtype == NFQ_PACKET_TYPE) {
            long long pid = -1;
            const unsigned char *pay = NULL;
            Py_ssize_t paylen = 0;
            Py_ssize_t a = pos + NLMSG_HDR + NFGEN_HDR;
            while (a + 4 <= end) {
                uint16_t alen, atype;
                memcpy(&alen, buf + a, 2);
                memcpy(&atype, buf + a + 2, 2);
                if (alen < 4 || a + alen > end)
                    break;
                atype &= NLA_TYPE_MASK;
                if (atype == NFQA_PACKET_HDR && alen >= 8) {
                    const unsigned char *p = buf + a + 4;
                    pid = ((long long)p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
                } else if (atype == NFQA_PAYLOAD) {
                    pay = buf + a + 4;
                    paylen = alen - 4;
                }
                a += (alen + 3) & ~3;
            }
            if (pid >= 0) {
                PyObject *payload;
                if (pay != NULL)
                    payload = PyBytes_FromStringAndSize((const char *)pay, paylen);
                else {
                    payload = Py_None;
                    Py_INCREF(payload);
                }
                if (payload == NULL)
                    return -1;
                PyObject *t = Py_BuildValue("(LN)", pid, payload);
                if (t == NULL)
                    return -1;
                int rc = PyList_Append(out, t);
                Py_DECREF(t);
                if (rc < 0)
                    return -1;
            }
        }
        pos += ((Py_ssize_t)mlen + 3) & ~3;
    }
    return 0;
}

static PyObject *
parse_nfqueue(PyObject *self, PyObject *arg)
{
    PyObject *fast = PySequence_Fast(arg, "datagrams must be a sequence of bytes");
    if (fast == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_SetString(PyExc_TypeError, "datagrams must be bytes");
            Py_CLEAR(out);
            break;
        }
        if (parse_one(out, (const unsigned char *)PyBytes_AS_STRING(items[i]),
                      PyBytes_GET_SIZE(items[i])) < 0)
            Py_CLEAR(out);
    }
    Py_DECREF(fast);
    return out;
}

static PyMethodDef methods[] = {
    {"parse_nfqueue", parse_nfqueue, METH_O,
     "parse_nfqueue(datagrams) -> list[(packet_id, payload | None)] of NFQNL_MSG_PACKET."},
    {"send_raw_batch", send_raw_batch, METH_VARARGS,
     "send_raw_batch(fd, packets, start=0) -> (sent, errno): sendmmsg of IPv4 packets, each "
     "to its own daddr; stops at the first refused packet."},
    {"send_link_batch", send_link_batch, METH_VARARGS,
     "send_link_batch(fd, ifindex, packets, headers, start=0) -> (sent, errno): sendmmsg of "
     "IPv4 packets as Ethernet frames on an AF_PACKET socket; stops at the first refusal."},
    {"send_raw_buffer", send_raw_buffer, METH_VARARGS,
     "send_raw_buffer(fd, buf, lengths, n, start=0) -> (sent, errno): send_raw_batch of n "
     "packets lying back to back in buf (u32 lengths)."},
    {"send_link_buffer", send_link_buffer, METH_VARARGS,
     "send_link_buffer(fd, ifindex, buf, lengths, n, headers, start=0) -> (sent, errno): "
     "send_link_batch of n packets lying back to back in buf (u32 lengths)."},
    {"recv_batch", recv_batch, METH_VARARGS,
     "recv_batch(fd, max=64, bufsize=4096) -> list[bytes] | -ENOBUFS: recvmmsg, non-blocking."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine.io._fastio", "Batched datagram I/O (sendmmsg, recvmmsg).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    return PyModule_Create(&module);
}
