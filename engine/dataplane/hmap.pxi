# A C open-addressing hash map for the session engine (included by engine.pyx).
#
# Keys are 12 bytes: a 4-tuple (ip_a, port_a, ip_b, port_b) packed as k0 = ip_a << 32 | ip_b
# and k1 = port_a << 16 | port_b (the allocator's groups use port_a = 0).  IPv6 will need a
# wider key; every caller goes through hm_key4 so there is one place to change.
#
# Linear probing with backward-shift deletion (no tombstones: a lookup ends at the first empty
# slot whatever was deleted before).  The capacity is a power of two, grown at 70 % load; a
# resize moves every slot, so a pointer returned by hm_get/hm_put is valid only until the next
# hm_put.  Each slot carries a double and an int64 for its owner's value; ``flags`` and ``aux``
# are the owner's too.

from libc.stdlib cimport malloc, calloc, free, realloc
from libc.string cimport memset, memcpy, memmove


ctypedef struct hslot:
    uint64_t k0
    uint32_t k1
    uint8_t used
    uint8_t flags
    uint16_t aux
    double d
    int64_t a


ctypedef struct hmap:
    hslot* slots
    size_t cap          # a power of two; 0 before the first hm_put
    size_t n


cdef enum:
    HM_MIN_CAP = 16


# Indexes of 8-byte slots (table.pxi TIndex, rewrite.pxi TState): a pointer with the top bits
# of its key's hash in bits TX_TAG_SHIFT and up (clear in Linux user-space pointers).
cdef enum:
    TX_TAG_SHIFT = 57


cdef uint64_t TX_VALUE_MASK = (<uint64_t>1 << TX_TAG_SHIFT) - 1


cdef inline uint64_t hm_mix(uint64_t z) noexcept nogil:
    # splitmix64's finaliser (the same mix as rewrite.py's _mix64, without the increment)
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline uint64_t hm_hash(uint64_t k0, uint32_t k1) noexcept nogil:
    return hm_mix(k0 + <uint64_t>0x9E3779B97F4A7C15 * (<uint64_t>k1 + 1))


cdef inline void hm_key4(uint32_t ip_a, uint16_t port_a, uint32_t ip_b, uint16_t port_b,
                         uint64_t* k0, uint32_t* k1) noexcept nogil:
    k0[0] = (<uint64_t>ip_a << 32) | ip_b
    k1[0] = (<uint32_t>port_a << 16) | port_b


cdef void hm_free(hmap* m) noexcept nogil:
    free(m.slots)
    m.slots = NULL
    m.cap = 0
    m.n = 0


cdef hslot* hm_get(const hmap* m, uint64_t k0, uint32_t k1) noexcept nogil:
    cdef size_t mask, i
    cdef hslot* s
    if m.cap == 0:
        return NULL
    mask = m.cap - 1
    i = <size_t>hm_hash(k0, k1) & mask
    while True:
        s = &m.slots[i]
        if not s.used:
            return NULL
        if s.k0 == k0 and s.k1 == k1:
            return s
        i = (i + 1) & mask


cdef int hm_resize(hmap* m, size_t cap) noexcept nogil:
    cdef hslot* old = m.slots
    cdef size_t old_cap = m.cap, j, i, mask = cap - 1
    cdef hslot* fresh = <hslot*>calloc(cap, sizeof(hslot))
    if fresh == NULL:
        return -1
    for j in range(old_cap):
        if old[j].used:
            i = <size_t>hm_hash(old[j].k0, old[j].k1) & mask
            while fresh[i].used:
                i = (i + 1) & mask
            fresh[i] = old[j]
    free(old)
    m.slots = fresh
    m.cap = cap
    return 0


cdef hslot* hm_put(hmap* m, uint64_t k0, uint32_t k1, bint* created) noexcept nogil:
    """The slot of the key, made (zeroed but for the key) when absent; NULL: no memory."""
    cdef size_t mask, i
    cdef hslot* s
    if (m.n + 1) * 10 > m.cap * 7:
        if hm_resize(m, m.cap * 2 if m.cap else HM_MIN_CAP) < 0:
            return NULL
    mask = m.cap - 1
    i = <size_t>hm_hash(k0, k1) & mask
    while True:
        s = &m.slots[i]
        if not s.used:
            memset(s, 0, sizeof(hslot))
            s.used = 1
            s.k0 = k0
            s.k1 = k1
            m.n += 1
            created[0] = True
            return s
        if s.k0 == k0 and s.k1 == k1:
            created[0] = False
            return s
        i = (i + 1) & mask


cdef void hm_del(hmap* m, hslot* s) noexcept nogil:
    """Remove the slot (from hm_get/hm_put): the run after it is shifted back."""
    cdef size_t mask = m.cap - 1
    cdef size_t i = <size_t>(s - m.slots), j = i, home
    while True:
        j = (j + 1) & mask
        if not m.slots[j].used:
            break
        home = <size_t>hm_hash(m.slots[j].k0, m.slots[j].k1) & mask
        # Move j back to i unless its home lies cyclically in (i, j].
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            m.slots[i] = m.slots[j]
            i = j
    m.slots[i].used = 0
    m.n -= 1


cdef int hm_shrink(hmap* m) noexcept nogil:
    """Rebuilt smaller when under 1/8 full (and larger than HM_MIN_CAP); -1: no memory (the
    map is left as it was).  Invalidates slot pointers, like hm_put."""
    cdef size_t cap = m.cap
    if cap <= HM_MIN_CAP or m.n * 8 >= cap:
        return 0
    while cap > HM_MIN_CAP and m.n * 10 <= (cap // 2) * 4:
        cap //= 2
    if m.n == 0:
        hm_free(m)
        return 0
    return hm_resize(m, cap)
