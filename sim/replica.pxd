# Cython declarations for sim/replica.py (pure-Python mode; see sim/engine.pxd). The router's
# compiled loop reads and writes these fields directly.

from sim.engine cimport Engine

cdef class Replica:
    cdef public long id
    cdef public long version
    cdef public object state
    cdef public long ongoing
    cdef public bint draining
    cdef public Engine engine
    cdef public long slot
    cdef public object node
    cdef public object created_at
    cdef public object gpu_at
    cdef public object ready_at
    cdef public object stopped_at
    cdef public object stop_reason
    cdef public object granted
