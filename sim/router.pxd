# Cython declarations for sim/router.py (pure-Python mode; see sim/engine.pxd). Every attribute
# a Router sets must be declared here.

cimport cython

from sim.engine cimport Engine, EngineModel
from sim.replica cimport Replica

cdef double INF

cdef class FixedModel:
    cdef public double[:] base
    cdef public object prefill
    cdef public double slowdown

cdef class Router:
    cdef public Py_ssize_t n
    cdef public object arrival_s
    cdef public double[:] arrivals
    cdef public object start_s, end_s, first_s, replica_id, version_of, status_of
    cdef public double[:] start
    cdef public double[:] end
    cdef public double[:] first
    cdef public int[:] replica
    cdef public unsigned char[:] version
    cdef public unsigned char[:] status
    cdef public unsigned char[:] fails
    cdef public tuple models
    cdef public long max_ongoing
    cdef public double timeout_s
    cdef public object on_drained
    cdef public double weight
    cdef public double session_weight
    cdef public double[:] sessions
    cdef public Py_ssize_t next_i
    cdef public list heap
    cdef public tuple lanes
    cdef public tuple ready
    cdef public tuple avail
    cdef public long inflight
    cdef public object _version_draw
    cdef public object _pick_draw

    @cython.locals(eng=Engine, t=double)
    cpdef _serve(self, Py_ssize_t k, Replica rep, double now)

    @cython.locals(arr="double[:]", heap=list, lanes=tuple, ready=tuple, avail=tuple,
                   end="double[:]", status="unsigned char[:]", fails="unsigned char[:]",
                   maxo=long, timeout=double, replica="int[:]", version="unsigned char[:]",
                   weight=double, sessions="double[:]", session_weight=double,
                   i=Py_ssize_t, t_arr=double, t=double, key=Py_ssize_t, rep=Replica,
                   eng=Engine, nt=double, drained=bint, v=long, k=Py_ssize_t, av=list,
                   reps=list, m=Py_ssize_t, a=Py_ssize_t, b=Py_ssize_t, other=Replica,
                   ongoing=long)
    cpdef advance(self, double until)
