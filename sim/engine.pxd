# Cython declarations for sim/engine.py (pure-Python mode: this file only adds C types; the
# .py stays the single source of the logic and runs as is when the extension is not built).
# Every attribute an Engine or EngineModel sets must be declared here.

cimport cython

cdef double _DUE

cdef class EngineModel:
    cdef public double max_seqs
    cdef public double kv_capacity
    cdef public list dt
    cdef public double dt_last
    cdef public double[:] prefill
    cdef public double[:] tokens
    cdef public double[:] kv_need  # None: no KV-cache books
    cdef public long warm_requests
    cdef public double warm_factor
    cdef public double warm_iterations
    cdef public bint iterations
    cdef public double[:] start
    cdef public double[:] first
    cdef public double[:] end

cdef class Engine:
    cdef public object queue
    cdef public list heap
    cdef public double v
    cdef public double tv
    cdef public double stall_end
    cdef public double kv
    cdef public EngineModel m
    cdef public long warm_left
    cdef public double next_t
    cdef public double scheduled

    @cython.locals(m=EngineModel, heap=list, n=Py_ssize_t, kvn="double[:]", dts=list,
                   se=double, v=double, tv=double, f=double)
    cpdef bint admit(self, Py_ssize_t k, double t, bint head=*)

    @cython.locals(m=EngineModel, heap=list, dts=list, se=double, dt=double, tv=double,
                   v=double, top=double, end="double[:]", kvn="double[:]", done=list,
                   k=Py_ssize_t)
    cpdef list wake(self, double t)

    cpdef warmed(self)

cdef class IterationEngine(Engine):
    cdef public list pending
    cdef public double pb
    cdef public double tb
    cdef public double ps
    cdef public double wv

    @cython.locals(w=double, f=double)
    cpdef double _span(self, double v0, double v1, double dt)

    @cython.locals(w=double, f=double, head=double)
    cpdef double _gain(self, double v0, double secs, double dt)

    cpdef double _stall(self)

    @cython.locals(heap=list, pend=list, dts=list, tb=double, se=double, first=double,
                   out="double[:]", k=Py_ssize_t, n=Py_ssize_t, s=double)
    cpdef _advance(self, double t)

    @cython.locals(heap=list, top=double, pend=list, dts=list, s=double)
    cpdef double _next(self)

    @cython.locals(m=EngineModel, heap=list, n=Py_ssize_t, kvn="double[:]", dts=list,
                   pend=list, v=double, pb=double, s=double, f=double)
    cpdef bint admit(self, Py_ssize_t k, double t, bint head=*)

    @cython.locals(m=EngineModel, heap=list, v=double, top=double, end="double[:]",
                   kvn="double[:]", done=list, k=Py_ssize_t)
    cpdef list wake(self, double t)

    cpdef warmed(self)
