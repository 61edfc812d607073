/*
 * What clients can make the server hold in memory: request payloads, read
 * buffers, block-status answers and replies not yet taken by a slow client.
 *
 * Every request is charged its worst case before anything is read or run
 * (budget_reserve in the connection's reader, which is the only thread that
 * waits here), and the charge is released when the worker is done; what a
 * slow client has not taken yet stays charged until the connection's writer
 * has sent it.
 *
 * Per connection: at most NBDS_MAX_IN_FLIGHT requests and
 * NBDS_MAX_IN_FLIGHT_BYTES bytes (a connection holding nothing may always
 * start one request).  Server-wide, the limit L (--max-buffered) is split
 * in two: every connection may hold a floor F = L / (2 x max connections)
 * without asking anyone, and what connections hold above their floor comes
 * from a shared pool of L / 2.  When the pool is used up, the connections
 * holding the most (above their floor) stop being read until it drains;
 * those within their floor (small requests, well-behaved clients) go on.
 * So all clients together hold at most L (plus one request when a client
 * that holds nothing finds the pool empty: always served), and one client
 * at most NBDS_MAX_IN_FLIGHT_BYTES.
 */
#include "internal.h"

void nbds_budget_init(NbdsBudget *b, uint64_t limit, unsigned max_connections)
{
    g_mutex_init(&b->lock);
    g_cond_init(&b->cond);
    b->limit = limit;
    b->floor = limit / 2 / MAX(max_connections, 1);
    b->pool_limit = limit - b->floor * MAX(max_connections, 1);
}

void nbds_budget_clear(NbdsBudget *b)
{
    g_mutex_clear(&b->lock);
    g_cond_clear(&b->cond);
}

/* The part of HELD above the floor: what it takes from the pool. */
static uint64_t above_floor(const NbdsBudget *b, uint64_t held)
{
    return held > b->floor ? held - b->floor : 0;
}

/* Change C's holding to HELD; b->lock held. */
static void set_held_locked(NbdsBudget *b, NbdsConn *c, uint64_t held)
{
    b->pool_used = b->pool_used - above_floor(b, c->held) + above_floor(b, held);
    b->total = b->total - c->held + held;
    b->peak = MAX(b->peak, b->total);
    c->held = held;
}

static bool may_reserve_locked(NbdsBudget *b, NbdsConn *c, uint64_t cost)
{
    uint64_t more_pool = above_floor(b, c->held + cost) - above_floor(b, c->held);

    if (c->held == 0 && c->requests == 0) {
        /* Never stop everyone: an idle client gets a request when the pool can take it. */
        return b->pool_used + more_pool <= b->pool_limit || b->pool_used == 0 ||
               more_pool == 0;
    }
    if (c->requests >= NBDS_MAX_IN_FLIGHT || c->held + cost > NBDS_MAX_IN_FLIGHT_BYTES) {
        return false;
    }
    return more_pool == 0 || b->pool_used + more_pool <= b->pool_limit;
}

bool nbds_budget_reserve(NbdsConn *c, uint64_t cost)
{
    NbdsBudget *b = &c->server->budget;

    g_mutex_lock(&b->lock);
    while (!may_reserve_locked(b, c, cost) && !g_atomic_int_get(&c->broken) &&
           !g_atomic_int_get(&c->server->shutting_down)) {
        g_cond_wait(&b->cond, &b->lock);
    }
    if (g_atomic_int_get(&c->broken) || !may_reserve_locked(b, c, cost)) {
        g_mutex_unlock(&b->lock);
        return false;
    }
    set_held_locked(b, c, c->held + cost);
    c->requests++;
    g_mutex_unlock(&b->lock);
    return true;
}

void nbds_budget_release(NbdsConn *c, uint64_t bytes, bool request)
{
    NbdsBudget *b = &c->server->budget;

    g_mutex_lock(&b->lock);
    g_assert(c->held >= bytes);
    set_held_locked(b, c, c->held - bytes);
    if (request) {
        g_assert(c->requests > 0);
        c->requests--;
    }
    g_cond_broadcast(&b->cond);
    g_mutex_unlock(&b->lock);
}

void nbds_budget_charge(NbdsConn *c, uint64_t bytes)
{
    NbdsBudget *b = &c->server->budget;

    g_mutex_lock(&b->lock);
    set_held_locked(b, c, c->held + bytes);
    g_mutex_unlock(&b->lock);
}

void nbds_budget_wake(NbdsServer *s)
{
    g_mutex_lock(&s->budget.lock);
    g_cond_broadcast(&s->budget.cond);
    g_mutex_unlock(&s->budget.lock);
}
