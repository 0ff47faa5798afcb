/*
 * State of one npctalk_client, shared by client.c (socket, receiving, liveness, reconnect) and
 * requests.c (building and sending the ops). Not thread-safe: one thread drives a client.
 */
#ifndef NPCTALK_CLIENT_H
#define NPCTALK_CLIENT_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#include "npctalk/npctalk.h"
#include "wire.h"

#define ID_CAP 32 /* "<12 hex>-<counter>" fits */
/* Said with every refused handshake: what to check. */
#define CURVE_HINT "check the CURVE keys: this client's pair, the server's public key, and that the server lists this client"

/* One say as the client sees it: open until its terminal message (then unlinked and freed). */
typedef struct stream {
    struct stream *next;
    npctalk_reply_id reply;
    char id[ID_CAP];
    char *npc;
    npctalk_callbacks callbacks;
    int64_t next_seq;      /* seq of the next message: 0, 1, 2, ... with no gap */
    char *text;            /* the token texts so far (NUL-terminated), compared with done.text */
    size_t text_len, text_cap;
    int64_t expires_ms;    /* client-side timeout (monotonic ms); 0: none */
    int cancel_sent;
} stream;

/* The blocking call in progress (at most one: blocking calls do not nest). */
typedef struct call {
    char id[ID_CAP];
    const char *op;
    msgpack_sbuffer frame;  /* kept for resending after a reconnect */
    int attempts;
    int finished;
    npctalk_status status;
    char *reply;            /* a copy of the ok frame (msgpack-c views point into the frame) */
    size_t reply_len;
    char error[512];        /* why it failed, when it did */
} call;

struct npctalk_client {
    void *context, *socket;
    void *monitor;         /* PAIR receiving the DEALER's connection events (a dropped connection) */
    uint64_t monitors;     /* numbers the monitor's inproc endpoints, one per socket opened */
    int handshake_failed;  /* the last handshake was refused (CURVE keys): said in timeout errors */
    int drop_seen;         /* a drop the monitor reported while send_frame looked: pump acts on it */
    char *endpoint;
    npctalk_options options;    /* the curve_* pointers are cleared: the keys live in `curve` */
    int use_curve;
    npctalk_curve_keys curve;
    char id_prefix[16];
    uint64_t counter;      /* request numbers; a say's number is its npctalk_reply_id */
    stream *streams;       /* running replies, newest first */
    size_t running;
    call *call;
    int64_t last_heard_ms, last_sent_ms;
    int dispatching;       /* > 0 while a callback runs: blocking calls are refused */
    int closing;           /* npctalk_close was called from a callback: free when it returns */
    char error[512];
};

/* --- status.c --- */
npctalk_status status_from_code_n(const char *code, size_t len);

static inline int pending(const npctalk_client *c) { return c->call != NULL || c->running > 0; }

/* --- client.c -------------------------------------------------------------------------------- */
int64_t now_ms(void);
/* Format the client's last error; returns `status` so callers can `return fail(c, ...)`. */
npctalk_status fail(npctalk_client *c, npctalk_status status, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void log_line(npctalk_client *c, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The next request id; its number goes to *number (may be NULL). */
void next_id(npctalk_client *c, char id[ID_CAP], uint64_t *number);
/* Something is about to be pending: start the silence clock if nothing was. */
void wake(npctalk_client *c);
/* A new DEALER (options, CURVE keys, monitor) connected to the endpoint; close_socket undoes it. */
npctalk_status open_socket(npctalk_client *c);
void close_socket(npctalk_client *c);
npctalk_status send_frame(npctalk_client *c, const msgpack_sbuffer *frame);
void send_cancel(npctalk_client *c, stream *s);
void send_simple(npctalk_client *c, const char *op, const char *target);
/* Wait (at most `timeout_ms`) and receive, dispatch, heartbeat, reconnect: one turn of the loop.
 * Returns NPCTALK_E_TIMEOUT when no frame arrived (internal meaning: "nothing yet"). */
npctalk_status pump(npctalk_client *c, int timeout_ms);
/* Free the client if npctalk_close was deferred from a callback. Returns 1 when it was freed. */
int finish_deferred_close(npctalk_client *c);

/* --- liveness.c ------------------------------------------------------------------------------ */
/* Milliseconds until service() may have work; -1 when nothing is pending. */
int64_t next_wakeup(const npctalk_client *c);
/* Client-side reply timeouts, heartbeats, the silence check (after receiving). */
void service(npctalk_client *c);
/* The monitor saw the TCP connection drop while something was pending. */
void connection_dropped(npctalk_client *c);

/* --- replies.c ------------------------------------------------------------------------------- */
/* One frame from the server: to the blocking call or stream it answers (others only show life). */
void feed(npctalk_client *c, const char *data, size_t len);
void free_stream(stream *s);
/* on_error for a stream already unlinked from the client, then free it. */
void report_error(npctalk_client *c, stream *s, npctalk_status status, const char *message);
/* End `s` with an error: optionally tell the server to stop, unlink, on_error, free. */
void fail_stream(npctalk_client *c, stream *s, npctalk_status status, int tell_server, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

#endif /* NPCTALK_CLIENT_H */
