/* Names of NBD protocol values.  One switch per table, next to the constants' names. */
#include "protostrings.h"

#include "protocol.h"

#define NAME(prefix, x) case prefix##x: return #x

const char *nbds_opt_name(uint32_t option)
{
    switch (option) {
    NAME(NBDS_OPT_, EXPORT_NAME);
    NAME(NBDS_OPT_, ABORT);
    NAME(NBDS_OPT_, LIST);
    NAME(NBDS_OPT_, PEEK_EXPORT);
    NAME(NBDS_OPT_, STARTTLS);
    NAME(NBDS_OPT_, INFO);
    NAME(NBDS_OPT_, GO);
    NAME(NBDS_OPT_, STRUCTURED_REPLY);
    NAME(NBDS_OPT_, LIST_META_CONTEXT);
    NAME(NBDS_OPT_, SET_META_CONTEXT);
    NAME(NBDS_OPT_, EXTENDED_HEADERS);
    default: return "unknown option";
    }
}

const char *nbds_rep_name(uint32_t reply)
{
    switch (reply) {
    NAME(NBDS_REP_, ACK);
    NAME(NBDS_REP_, SERVER);
    NAME(NBDS_REP_, INFO);
    NAME(NBDS_REP_, META_CONTEXT);
    NAME(NBDS_REP_, ERR_UNSUP);
    NAME(NBDS_REP_, ERR_POLICY);
    NAME(NBDS_REP_, ERR_INVALID);
    NAME(NBDS_REP_, ERR_PLATFORM);
    NAME(NBDS_REP_, ERR_TLS_REQD);
    NAME(NBDS_REP_, ERR_UNKNOWN);
    NAME(NBDS_REP_, ERR_SHUTDOWN);
    NAME(NBDS_REP_, ERR_BLOCK_SIZE_REQD);
    NAME(NBDS_REP_, ERR_TOO_BIG);
    NAME(NBDS_REP_, ERR_EXT_HEADER_REQD);
    default: return "unknown reply";
    }
}

const char *nbds_cmd_name(uint16_t type)
{
    switch (type) {
    NAME(NBDS_CMD_, READ);
    NAME(NBDS_CMD_, WRITE);
    NAME(NBDS_CMD_, DISC);
    NAME(NBDS_CMD_, FLUSH);
    NAME(NBDS_CMD_, TRIM);
    NAME(NBDS_CMD_, CACHE);
    NAME(NBDS_CMD_, WRITE_ZEROES);
    NAME(NBDS_CMD_, BLOCK_STATUS);
    default: return "unknown command";
    }
}

const char *nbds_err_name(uint32_t error)
{
    switch (error) {
    case 0: return "success";
    NAME(NBDS_, EPERM);
    NAME(NBDS_, EIO);
    NAME(NBDS_, ENOMEM);
    NAME(NBDS_, EINVAL);
    NAME(NBDS_, ENOSPC);
    NAME(NBDS_, EOVERFLOW);
    NAME(NBDS_, ENOTSUP);
    NAME(NBDS_, ESHUTDOWN);
    default: return "unknown error";
    }
}
