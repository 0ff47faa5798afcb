/*
 * The socket half of the client: connect, receive and dispatch, heartbeats, Lazy Pirate reconnect
 * (ZeroMQ Guide, lpclient): while something is pending and the server has said nothing for
 * timeout_ms, close the DEALER with LINGER 0, open a new one, resend the blocking call (at most
 * `retries` times) and fail the running replies with NPCTALK_E_UNAVAILABLE.
 */
#define _POSIX_C_SOURCE 200809L
#include "client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

static _Thread_local char connect_error[512];

int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

npctalk_status fail(npctalk_client *c, npctalk_status status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(c->error, sizeof c->error, format, args);
    va_end(args);
    return status;
}

void log_line(npctalk_client *c, const char *format, ...) {
    if (c->options.log == NULL) return;
    char line[512];
    va_list args;
    va_start(args, format);
    vsnprintf(line, sizeof line, format, args);
    va_end(args);
    c->options.log(c->options.log_user, line);
}

void next_id(npctalk_client *c, char id[ID_CAP], uint64_t *number) {
    uint64_t n = ++c->counter;
    snprintf(id, ID_CAP, "%s-%llu", c->id_prefix, (unsigned long long)n);
    if (number) *number = n;
}

void wake(npctalk_client *c) {
    if (!pending(c)) c->last_heard_ms = now_ms(); /* silence counts from the first pending request */
}

/* --- connection ------------------------------------------------------------------------------ */

#define MONITORED_EVENTS                                                                   \
    (ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | \
     ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

npctalk_status open_socket(npctalk_client *c) {
    void *sock = zmq_socket(c->context, ZMQ_DEALER);
    void *monitor = zmq_socket(c->context, ZMQ_PAIR);
    if (sock == NULL || monitor == NULL) {
        int err = errno;
        if (sock) zmq_close(sock);
        if (monitor) zmq_close(monitor);
        return fail(c, NPCTALK_E_SOCKET, "Cannot create ZeroMQ sockets: %s.", zmq_strerror(err));
    }
    int linger = 0, heartbeat = c->options.heartbeat_ms, heartbeat_timeout = 3 * c->options.heartbeat_ms;
    int64_t max_message = WIRE_MAX_REPLY_BYTES;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger); /* a closed socket drops what it queued */
    zmq_setsockopt(monitor, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max_message, sizeof max_message);
    zmq_setsockopt(sock, ZMQ_HEARTBEAT_IVL, &heartbeat, sizeof heartbeat); /* ZMTP: notices dead TCP peers */
    zmq_setsockopt(sock, ZMQ_HEARTBEAT_TIMEOUT, &heartbeat_timeout, sizeof heartbeat_timeout);
    if (c->use_curve && (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, c->curve.server_key, 40) != 0 ||
                         zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, c->curve.public_key, 40) != 0 ||
                         zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->curve.secret_key, 40) != 0)) {
        int err = errno;
        zmq_close(sock);
        zmq_close(monitor);
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "The CURVE keys were refused: %s%s.", zmq_strerror(err),
                    zmq_has("curve") ? " (each must be 40 Z85 characters)" : " (this libzmq was built without CURVE)");
    }
    char address[64];
    snprintf(address, sizeof address, "inproc://npctalk-monitor-%llu", (unsigned long long)++c->monitors);
    if (zmq_socket_monitor(sock, address, MONITORED_EVENTS) != 0 || zmq_connect(monitor, address) != 0) {
        int err = errno;
        zmq_close(sock);
        zmq_close(monitor);
        return fail(c, NPCTALK_E_SOCKET, "Cannot monitor the connection: %s.", zmq_strerror(err));
    }
    if (zmq_connect(sock, c->endpoint) != 0) {
        int err = errno;
        zmq_socket_monitor(sock, NULL, 0);
        zmq_close(monitor);
        zmq_close(sock);
        return fail(c, NPCTALK_E_SOCKET, "Cannot connect to '%s': %s (use tcp://HOST:PORT or ipc://PATH).",
                    c->endpoint, zmq_strerror(err));
    }
    c->socket = sock;
    c->monitor = monitor;
    c->handshake_failed = 0;
    c->drop_seen = 0;
    return NPCTALK_OK;
}

void close_socket(npctalk_client *c) {
    if (c->socket == NULL) return;
    zmq_socket_monitor(c->socket, NULL, 0); /* stop events before their reader goes away */
    zmq_close(c->monitor);
    zmq_close(c->socket);
    c->socket = c->monitor = NULL;
}

npctalk_options npctalk_default_options(void) {
    npctalk_options o = {3000, 2, 1000, NULL, NULL, NULL, NULL, NULL};
    return o;
}

/* All three keys or none; each 40 characters. Returns a sentence, or NULL when fine. */
static const char *curve_problem(const npctalk_options *o) {
    const char *keys[] = {o->curve_server_key, o->curve_public_key, o->curve_secret_key};
    int given = (keys[0] != NULL) + (keys[1] != NULL) + (keys[2] != NULL);
    if (given == 0) return NULL;
    if (given != 3) return "CURVE needs all three keys (curve_server_key, curve_public_key, curve_secret_key) or none.";
    for (int i = 0; i < 3; i++)
        if (strlen(keys[i]) != 40) return "Each CURVE key must be 40 Z85 characters (see npctalk_load_curve_keys).";
    return NULL;
}

npctalk_status npctalk_connect(const char *endpoint, const npctalk_options *options, npctalk_client **out) {
    npctalk_options o = options ? *options : npctalk_default_options();
    connect_error[0] = '\0';
    if (out) *out = NULL;
    if (out == NULL || endpoint == NULL || endpoint[0] == '\0') {
        snprintf(connect_error, sizeof connect_error, "npctalk_connect needs an endpoint and an output pointer.");
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    if (o.timeout_ms <= 0 || o.heartbeat_ms <= 0 || o.retries < 0) {
        snprintf(connect_error, sizeof connect_error,
                 "timeout_ms and heartbeat_ms must be > 0 and retries >= 0, got %d, %d and %d.", o.timeout_ms,
                 o.heartbeat_ms, o.retries);
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    const char *curve = curve_problem(&o);
    if (curve) {
        snprintf(connect_error, sizeof connect_error, "%s", curve);
        return NPCTALK_E_INVALID_ARGUMENT;
    }
    if (o.heartbeat_ms > o.timeout_ms / 2) o.heartbeat_ms = o.timeout_ms / 2 > 0 ? o.timeout_ms / 2 : 1;
    npctalk_client *c = calloc(1, sizeof *c);
    if (c) c->endpoint = strdup(endpoint);
    if (c) c->context = zmq_ctx_new();
    if (c == NULL || c->endpoint == NULL || c->context == NULL) {
        snprintf(connect_error, sizeof connect_error, "Out of memory while creating the client.");
        if (c) free(c->endpoint);
        free(c);
        return NPCTALK_E_NO_MEMORY;
    }
    c->use_curve = o.curve_server_key != NULL;
    if (c->use_curve) { /* copied: reconnects need them after the caller's strings are gone */
        memcpy(c->curve.server_key, o.curve_server_key, 41);
        memcpy(c->curve.public_key, o.curve_public_key, 41);
        memcpy(c->curve.secret_key, o.curve_secret_key, 41);
    }
    o.curve_server_key = o.curve_public_key = o.curve_secret_key = NULL;
    c->options = o;
    /* Ids only need to be unique among this client's running requests; a random prefix also keeps
     * them apart across reconnects and restarts in the server's logs. */
    unsigned int seed = (unsigned int)now_ms() ^ (unsigned int)(uintptr_t)c;
    FILE *urandom = fopen("/dev/urandom", "rb");
    if (urandom) {
        if (fread(&seed, sizeof seed, 1, urandom) != 1) seed ^= (unsigned int)time(NULL);
        fclose(urandom);
    }
    snprintf(c->id_prefix, sizeof c->id_prefix, "%08x", seed);
    npctalk_status status = open_socket(c);
    if (status != NPCTALK_OK) {
        snprintf(connect_error, sizeof connect_error, "%s", c->error);
        zmq_ctx_term(c->context);
        free(c->endpoint);
        free(c);
        return status;
    }
    c->last_heard_ms = c->last_sent_ms = now_ms();
    *out = c;
    return NPCTALK_OK;
}

const char *npctalk_connect_error(void) { return connect_error; }

const char *npctalk_last_error(const npctalk_client *c) { return c ? c->error : "No client."; }

static void destroy(npctalk_client *c) {
    volatile unsigned char *key = (volatile unsigned char *)&c->curve; /* volatile: not optimized away */
    for (size_t i = 0; i < sizeof c->curve; i++) key[i] = 0;       /* no secret key left in freed memory */
    while (c->streams) {
        stream *s = c->streams;
        c->streams = s->next;
        free_stream(s);
    }
    close_socket(c);
    zmq_ctx_term(c->context);
    free(c->endpoint);
    free(c);
}

void npctalk_close(npctalk_client *c) {
    if (c == NULL) return;
    if (c->dispatching > 0) {
        c->closing = 1; /* freed by the npctalk_* call that ran the callback, when it returns */
        return;
    }
    destroy(c);
}

int finish_deferred_close(npctalk_client *c) {
    if (!c->closing || c->dispatching > 0) return 0;
    destroy(c);
    return 1;
}

static int drain_monitor(npctalk_client *c);

npctalk_status send_frame(npctalk_client *c, const msgpack_sbuffer *frame) {
    if (c->socket == NULL && open_socket(c) != NPCTALK_OK) return NPCTALK_E_SOCKET; /* a reopen had failed */
    if (zmq_send(c->socket, frame->data, frame->size, ZMQ_DONTWAIT) < 0) {
        int err = errno;
        if (err != EAGAIN) return fail(c, NPCTALK_E_SOCKET, "Sending to %s failed: %s.", c->endpoint, zmq_strerror(err));
        /* No queue to the server can also mean libzmq dropped it after a refused handshake: say that. */
        c->drop_seen |= drain_monitor(c);
        if (c->handshake_failed)
            return fail(c, NPCTALK_E_UNAVAILABLE, "The server at %s refused the connection's handshake (%s).",
                        c->endpoint, CURVE_HINT);
        return fail(c, NPCTALK_E_SOCKET, "Cannot queue a message for %s: the send queue is full (the server "
                                         "has not read for a long time).", c->endpoint);
    }
    c->last_sent_ms = now_ms();
    return NPCTALK_OK;
}

void send_simple(npctalk_client *c, const char *op, const char *target) {
    char id[ID_CAP];
    next_id(c, id, NULL);
    msgpack_sbuffer frame;
    msgpack_sbuffer_init(&frame);
    wire_simple(&frame, id, op, target);
    if (send_frame(c, &frame) != NPCTALK_OK) log_line(c, "%s", c->error); /* the silence check still runs */
    msgpack_sbuffer_destroy(&frame);
}

void send_cancel(npctalk_client *c, stream *s) {
    send_simple(c, "cancel", s->id); /* its ok answer (found: bool) only counts as a sign of life */
    s->cancel_sent = 1;
}

/* --- receiving ------------------------------------------------------------------------------- */

/* Feed every frame that has arrived, without waiting. */
static npctalk_status drain(npctalk_client *c, int *received) {
    while (!c->closing) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, c->socket, ZMQ_DONTWAIT) < 0) {
            int err = errno;
            zmq_msg_close(&msg);
            if (err == EAGAIN) return NPCTALK_OK;
            if (err == EINTR) continue;
            return fail(c, NPCTALK_E_SOCKET, "Receiving from %s failed: %s.", c->endpoint, zmq_strerror(err));
        }
        (*received)++;
        if (zmq_msg_more(&msg)) {
            log_line(c, "Ignoring a multi-part message: the protocol sends one frame per message.");
            while (zmq_msg_more(&msg) && zmq_msg_recv(&msg, c->socket, ZMQ_DONTWAIT) >= 0) {}
        } else {
            feed(c, zmq_msg_data(&msg), zmq_msg_size(&msg));
        }
        zmq_msg_close(&msg);
    }
    return NPCTALK_OK;
}

/* Read the monitor's events; 1 when the connection dropped. An event is two frames: 2 bytes of
 * event id and 4 of value, then the endpoint. */
static int drain_monitor(npctalk_client *c) {
    int dropped = 0;
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, c->monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            return dropped;
        }
        uint16_t event = 0;
        if (zmq_msg_size(&msg) >= sizeof event) memcpy(&event, zmq_msg_data(&msg), sizeof event);
        while (zmq_msg_more(&msg) && zmq_msg_recv(&msg, c->monitor, ZMQ_DONTWAIT) >= 0) {}
        zmq_msg_close(&msg);
        if (event == ZMQ_EVENT_DISCONNECTED) {
            dropped = 1;
        } else if (!c->handshake_failed) {
            c->handshake_failed = 1;
            log_line(c, "The handshake with %s failed (libzmq event 0x%x).", c->endpoint, event);
        }
    }
}

npctalk_status pump(npctalk_client *c, int timeout_ms) {
    if (c->socket == NULL && open_socket(c) != NPCTALK_OK) return NPCTALK_E_SOCKET; /* a reopen had failed */
    int64_t wake_in = next_wakeup(c);
    int64_t wait = timeout_ms < 0 ? 0 : timeout_ms;
    if (wake_in >= 0 && wake_in < wait) wait = wake_in;
    if (wait > 0) {
        zmq_pollitem_t items[2] = {{c->socket, 0, ZMQ_POLLIN, 0}, {c->monitor, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, (long)wait) < 0 && errno != EINTR)
            return fail(c, NPCTALK_E_SOCKET, "Polling %s failed: %s.", c->endpoint, zmq_strerror(errno));
    }
    int received = 0;
    npctalk_status status = drain(c, &received); /* what arrived before a drop is still delivered */
    int dropped = drain_monitor(c) | c->drop_seen;
    c->drop_seen = 0;
    if (!c->closing && dropped && pending(c)) {
        connection_dropped(c);
        received++;
    }
    if (!c->closing) service(c);
    return status != NPCTALK_OK ? status : received > 0 ? NPCTALK_OK : NPCTALK_E_TIMEOUT;
}

npctalk_status npctalk_poll(npctalk_client *c, int timeout_ms) {
    if (c == NULL) return NPCTALK_E_INVALID_ARGUMENT;
    if (c->dispatching > 0)
        return fail(c, NPCTALK_E_INVALID_ARGUMENT, "npctalk_poll was called from a callback; return from it instead.");
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    npctalk_status status;
    do {
        int64_t left = deadline - now_ms();
        status = pump(c, left > 0 ? (int)left : 0);
    } while (status == NPCTALK_E_TIMEOUT && !c->closing && now_ms() < deadline);
    if (finish_deferred_close(c)) return NPCTALK_OK;
    return status == NPCTALK_E_TIMEOUT ? NPCTALK_OK : status;
}

size_t npctalk_running(const npctalk_client *c) { return c ? c->running : 0; }
