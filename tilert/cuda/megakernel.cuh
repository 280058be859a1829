// The persistent kernel: one CTA per worker walks its own instruction stream.
//
// Roles.  Warps 0..TILERT_NCW-1 compute: before a task, thread 0 spins (acquire) on the
// counters it waits for; a barrier lets the others in; the task's stages run one after
// another; after a barrier, thread 0 releases (fence + atomic add) the counters the task
// signals.  With TILERT_LOADER, warp TILERT_NCW is the loader: its lane 0 walks the same
// stream and streams every weight tile the compute warps will read into the smem ring, running
// ahead across task boundaries (weights never change) except before a tile whose expert comes
// from the router: then it first waits until its own compute warps finished the earlier tasks
// of the stream (the router may have run right here, needing no counter) and on that task's
// counters, like the compute warps do; once a layer (codegen IDS_KNOWN).
//
// Counters are never reset.  Each step adds `target` to a counter, so in step `step` the
// threshold of a wait (c, v) is step * target[c] + v (unsigned, compared wrap-safely).
//
// Requires the generated dispatch (`run_stage`, `stage_tiles`) to be defined before inclusion.
#pragma once

#include "kinds.cuh"

namespace tilert {

TILERT_DEV const int32_t* program(const Ctx& c) { return reinterpret_cast<const int32_t*>(c.a->program); }

// One task record of the encoded stream (layout: tilert/codegen.py, `encode_program`).
struct TaskView {
  const int32_t* p;
  TILERT_DEV int id() const { return p[0]; }
  TILERT_DEV int n_waits() const { return p[1]; }
  TILERT_DEV int n_signals() const { return p[2]; }
  TILERT_DEV int n_stages() const { return p[3] & 0xffff; }
  // The loader already waited for the expert ids this task's tiles read (codegen IDS_KNOWN).
  TILERT_DEV bool ids_known() const { return p[3] >> 16; }
  TILERT_DEV const int32_t* waits() const { return p + 4; }
  TILERT_DEV const int32_t* signals() const { return p + 4 + 2 * n_waits(); }
  TILERT_DEV const int32_t* stage(int s) const { return signals() + n_signals() + s * (1 + TILERT_PARAM_WORDS); }
  TILERT_DEV TaskView next() const { return TaskView{stage(n_stages())}; }
};

TILERT_DEV volatile int* ctrl(const Ctx& c) { return reinterpret_cast<volatile int*>(c.smem + TILERT_SMEM_CTRL); }

TILERT_DEV bool stopped(const Ctx& c, const TaskView& t) { return c.a->stop_after >= 0 && t.id() > c.a->stop_after; }

// Spin until each counter the task waits on reaches this step's threshold.  With the watchdog,
// a wait longer than timeout_ns records a hang and returns false; `abort` (if given) is polled.
TILERT_DEV bool wait_counters(Ctx& c, const TaskView& t, bool watchdog, const volatile int* abort) {
  const int32_t* P = program(c);
  const uint32_t* targets = reinterpret_cast<const uint32_t*>(P + P[PROG_TARGETS]);
  uint32_t* counters = reinterpret_cast<uint32_t*>(c.a->counters);
  for (int i = 0; i < t.n_waits(); ++i) {
    const int ctr = t.waits()[2 * i];
    const uint32_t need = c.a->step * targets[ctr] + (uint32_t)t.waits()[2 * i + 1];
    uint32_t seen = ld_acquire(counters + ctr);
    if ((int)(seen - need) >= 0) continue;
    const uint64_t t0 = globaltimer();
    uint32_t spins = 0;
    while ((int)((seen = ld_acquire(counters + ctr)) - need) < 0) {
      if (++spins > 32) __nanosleep(64);
      if ((spins & 63) == 0) {
        if (abort && *abort) return false;
        if (watchdog && c.a->timeout_ns && globaltimer() - t0 > c.a->timeout_ns) {
          record_error(c, ERR_HANG, ctr, seen, need, 0);
          return false;
        }
      }
    }
  }
  return true;
}

TILERT_DEV void profile(const Ctx& c, int field) {
#if TILERT_PROFILE
  reinterpret_cast<uint64_t*>(c.a->profile)[4 * c.task + field] = field == 3 ? (uint64_t)c.worker : globaltimer();
#endif
}

TILERT_DEV TaskView first_task(const Ctx& c, int& n) {
  const int32_t* P = program(c);
  const int32_t* s = P + P[P[PROG_STREAMS] + c.worker];
  n = s[0];
  return TaskView{s + 1};
}

// The compute warps read their task records (waits, signals, stage parameters) from shared
// memory: each record is fetched into registers while the previous task runs and stored into
// one of two buffers (tilert/codegen.py sizes them: TILERT_TASK_WORDS, the longest record).
// Read straight from global memory, a one-off task waited for several dependent L2 round trips
// (the record's header, then its parameters, then the pointers they name) before any work.
constexpr int kTaskLoads = (TILERT_TASK_WORDS + kNCT - 1) / kNCT;

TILERT_DEV int32_t* task_buffer(const Ctx& c, int i) {
  return reinterpret_cast<int32_t*>(c.smem + TILERT_SMEM_TASKS) + (i & 1) * TILERT_TASK_WORDS;
}

struct RecordWords {
  int32_t w[kTaskLoads];
};

// This thread's words of the TILERT_TASK_WORDS starting at `rec` (the program is padded so
// that the read never leaves it).
TILERT_DEV RecordWords load_record(const int32_t* rec) {
  RecordWords r;
#pragma unroll
  for (int k = 0; k < kTaskLoads; ++k) {
    const int j = ctid() + k * kNCT;
    r.w[k] = j < TILERT_TASK_WORDS ? __ldg(rec + j) : 0;
  }
  return r;
}

TILERT_DEV void store_record(int32_t* buf, const RecordWords& r) {
#pragma unroll
  for (int k = 0; k < kTaskLoads; ++k) {
    const int j = ctid() + k * kNCT;
    if (j < TILERT_TASK_WORDS) buf[j] = r.w[k];
  }
}

TILERT_DEV void compute_loop(Ctx& c) {
  int n;
  const int32_t* rec = first_task(c, n).p;  // the current record in global memory
  store_record(task_buffer(c, 0), load_record(rec));
  compute_sync();
  for (int i = 0; i < n; ++i) {
    const TaskView t{task_buffer(c, i)};
    if (stopped(c, t)) break;
    const int32_t* next_rec = rec + (t.next().p - t.p);
    RecordWords next = {};
    if (i + 1 < n) next = load_record(next_rec);  // lands while this task runs
    c.task = t.id();
    if (ctid() == 0) {
      profile(c, 0);
      if (!wait_counters(c, t, true, nullptr)) ctrl(c)[CTRL_ABORT] = 1;
      profile(c, 1);
    }
    compute_sync();
    if (ctrl(c)[CTRL_ABORT]) break;  // uniform: every compute thread reads it after the barrier
    const int stages = t.n_stages();
    for (int s = 0; s < stages; ++s) {
      const int32_t* st = t.stage(s);
      run_stage(c, st[0], st + 1);
      // The next record goes to the other buffer (the previous task's, read by nobody now)
      // before the last barrier, which then also publishes it.
      if (s == stages - 1) store_record(task_buffer(c, i + 1), next);
      compute_sync();  // the next stage (or the signal) sees everything this one wrote
    }
    if (stages == 0) {
      store_record(task_buffer(c, i + 1), next);
      compute_sync();
    }
    if (ctid() == 0) {
      __threadfence();  // release: the task's writes, gathered by the barrier, before the signal
      uint32_t* counters = reinterpret_cast<uint32_t*>(c.a->counters);
      for (int k = 0; k < t.n_signals(); ++k) atomicAdd(counters + t.signals()[k], 1u);
      ctrl(c)[CTRL_DONE] = i + 1;  // tasks of this stream done (read by the loader)
      profile(c, 2);
      profile(c, 3);
    }
    rec = next_rec;
  }
}

#if TILERT_LOADER
TILERT_DEV void loader_loop(Ctx& c) {
  const volatile int* abort = ctrl(c) + CTRL_ABORT;
  uint32_t issued = 0;
  int n;
  TaskView t = first_task(c, n);
  bool ok = true;
  for (int i = 0; i < n && ok; ++i, t = t.next()) {
    if (stopped(c, t)) break;
    c.task = t.id();
    // A task whose expert ids this loader already waited for (the down projection after its
    // gate/up, codegen IDS_KNOWN) streams its experts at once, instead of waiting for every
    // earlier task here and for all of its inputs (the whole gate/up phase).
    bool waited = t.ids_known();
    for (int s = 0; s < t.n_stages() && ok; ++s) {
      const int32_t* st = t.stage(s);
      stage_tiles(c, st[0], st + 1, [&](const Tile& tile, int) {
        if (!ok) return;
        if (tile.idx && !waited) {  // the expert id is an output of the router: wait for it
          uint32_t spins = 0;
          while (ctrl(c)[CTRL_DONE] < i && ok) {  // earlier tasks of this worker
            if ((++spins & 255) == 0 && *abort) ok = false;
          }
          __threadfence_block();  // ... and what they wrote, before reading the expert id
          ok = ok && wait_counters(c, t, false, abort);
          waited = true;
          if (!ok) return;
        }
        const int expert = tile_expert(tile);
        if (expert < 0) return;  // an empty union slot (kinds.cuh): its compute side skips it too
        const Issued r = load_tile(c.smem, weight(c, tile.w), expert, tile.r0, tile.r1, issued, abort);
        issued = r.pieces;
        ok = !r.aborted;
      });
    }
  }
  ctrl(c)[CTRL_ISSUED] = (int)issued;  // the pieces thread 0 lets land before the CTA exits
}
#endif

// All threads of the CTA, arriving from divergent code (non-.aligned barrier).
TILERT_DEV void cta_sync_all() { asm volatile("barrier.sync 0;" ::: "memory"); }

TILERT_DEV void run(const KernelArgs* a, uint8_t* smem) {
  Ctx c{a, smem, (int)blockIdx.x, -1, 0};
  if (threadIdx.x == 0) {
    set_space_bases(c);
    ctrl(c)[CTRL_ABORT] = 0;
    ctrl(c)[CTRL_ISSUED] = 0;
    ctrl(c)[CTRL_DONE] = 0;
#if TILERT_LOADER
    for (int s = 0; s < TILERT_SLOTS; ++s) {
      mbar_init(ring_full(smem, s), 1);
      mbar_init(ring_empty(smem, s), kNCW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
  }
  __syncthreads();
  if (threadIdx.x < kNCT) {
    compute_loop(c);
    // Stop the loader too: it never needs to wait once the compute warps are done (it issues
    // exactly the pieces they consume), so this only unblocks it after an abort or a bug.
    if (threadIdx.x == 0) ctrl(c)[CTRL_ABORT] = 1;
  }
#if TILERT_LOADER
  else if (threadIdx.x == kNCT) {
    loader_loop(c);
  }
#endif
  cta_sync_all();
#if TILERT_LOADER
  // After an abort the loader may have issued pieces nobody consumed: let them land first.
  if (threadIdx.x == 0) {
    const uint32_t issued = (uint32_t)ctrl(c)[CTRL_ISSUED];
    for (uint32_t j = c.piece; j < issued; ++j) ring_wait_full(c, j);
  }
#endif
}

}  // namespace tilert

extern "C" __global__ void __launch_bounds__(TILERT_THREADS, 1) tilert_megakernel(const __grid_constant__ tilert::KernelArgs args) {
  extern __shared__ __align__(128) uint8_t tilert_smem[];
  tilert::run(&args, tilert_smem);
}
