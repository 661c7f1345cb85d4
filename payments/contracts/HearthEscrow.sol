// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

import {IERC3009} from "./IERC3009.sol";

/// @title Hearth job escrow: a payer locks a job's price, the provider is paid against a validator receipt.
/// @notice A job is funded once (`fund` after an ERC-20 approve, or gas-free for the payer with an EIP-3009
/// authorization bound to the job's terms), then settles exactly once: `release` pays the provider what the
/// validator's EIP-712 receipt allows and returns the rest to the payer; `refund` returns everything to the
/// payer after the deadline, or earlier against a failing receipt.
/// @dev A failing receipt (passed = false) carries amount = 0: nothing is payable to the provider.
contract HearthEscrow is ReentrancyGuard, EIP712 {
    using SafeERC20 for IERC20;

    /// @notice Where a job stands; `None` means the job id was never funded.
    enum Status {
        None,
        Open,
        Released,
        Refunded
    }

    /// @notice The terms a job was funded with and its state.
    struct Job {
        address payer;
        uint64 deadline;
        Status status;
        address provider;
        address validator;
        uint256 amount;
    }

    /// @notice The EIP-712 type of a validator's receipt.
    bytes32 public constant RECEIPT_TYPEHASH =
        keccak256("Receipt(bytes32 jobId,bytes32 resultDigest,bool passed,uint256 amount,address provider)");

    /// @notice The token every job is paid in (USDC or, on dev chains, TestUSDC).
    IERC20 public immutable token;

    /// @notice Every job ever funded, by id.
    mapping(bytes32 jobId => Job) public jobs;

    event Funded(
        bytes32 indexed jobId,
        address indexed payer,
        address indexed provider,
        address validator,
        uint256 amount,
        uint64 deadline
    );
    event Released(
        bytes32 indexed jobId,
        address indexed provider,
        uint256 paid,
        uint256 refunded,
        bytes32 resultDigest
    );
    event Refunded(bytes32 indexed jobId, address indexed payer, uint256 amount, bytes32 resultDigest);

    /// @notice The job id was funded before.
    error JobExists(bytes32 jobId);
    /// @notice The job is not funded, or already settled.
    error JobNotOpen(bytes32 jobId);
    /// @notice A zero address, a zero amount or a deadline not in the future.
    error InvalidTerms();
    /// @notice The receipt asks to pay more than the job holds.
    error AmountExceedsFunded(uint256 amount, uint256 funded);
    /// @notice The receipt was not signed by the job's validator for these values.
    error InvalidReceipt(address signer);
    /// @notice A refund before the deadline needs a failing receipt.
    error DeadlineNotReached(uint64 deadline);
    error ZeroToken();

    constructor(IERC20 token_) EIP712("HearthEscrow", "1") {
        if (address(token_) == address(0)) revert ZeroToken();
        token = token_;
    }

    /// @notice Funds `jobId` with `amount` the caller approved this contract to take.
    function fund(bytes32 jobId, address provider, address validator, uint256 amount, uint64 deadline)
        external
        nonReentrant
    {
        _open(jobId, msg.sender, provider, validator, amount, deadline);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Funds `jobId` from `payer` with an EIP-3009 ReceiveWithAuthorization whose nonce is
    /// `authorizationNonce(jobId, provider, validator, amount, deadline)`, so it pays for these terms only.
    function fundWithAuthorization(
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline,
        address payer,
        uint256 validAfter,
        uint256 validBefore,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        _open(jobId, payer, provider, validator, amount, deadline);
        bytes32 nonce = authorizationNonce(jobId, provider, validator, amount, deadline);
        IERC3009(address(token)).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, v, r, s
        );
    }

    /// @notice Pays `amount` to the job's provider against the validator's passing receipt and returns the
    /// rest to the payer. Anyone may submit it: the receipt alone decides who gets what.
    function release(bytes32 jobId, uint256 amount, bytes32 resultDigest, bytes calldata receiptSignature)
        external
        nonReentrant
    {
        Job storage job = _openJob(jobId);
        uint256 funded = job.amount;
        if (amount > funded) revert AmountExceedsFunded(amount, funded);
        _checkReceipt(job, jobId, resultDigest, true, amount, receiptSignature);

        job.status = Status.Released;
        address provider = job.provider;
        address payer = job.payer;
        uint256 remainder = funded - amount;
        emit Released(jobId, provider, amount, remainder, resultDigest);

        if (amount > 0) token.safeTransfer(provider, amount);
        if (remainder > 0) token.safeTransfer(payer, remainder);
    }

    /// @notice Returns the whole amount to the payer: by anyone once the deadline has passed (the receipt
    /// arguments are then ignored), or before it against the validator's failing receipt (amount 0).
    function refund(bytes32 jobId, bytes32 resultDigest, bytes calldata receiptSignature) external nonReentrant {
        Job storage job = _openJob(jobId);
        if (block.timestamp <= job.deadline) {
            if (receiptSignature.length == 0) revert DeadlineNotReached(job.deadline);
            _checkReceipt(job, jobId, resultDigest, false, 0, receiptSignature);
        }

        job.status = Status.Refunded;
        address payer = job.payer;
        uint256 amount = job.amount;
        emit Refunded(jobId, payer, amount, resultDigest);

        token.safeTransfer(payer, amount);
    }

    /// @notice The EIP-3009 nonce that binds a payer's authorization to one job's terms.
    function authorizationNonce(
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline
    ) public pure returns (bytes32) {
        return keccak256(abi.encode(jobId, provider, validator, amount, deadline));
    }

    /// @notice The EIP-712 digest a validator signs for a receipt (lets clients check before submitting).
    function receiptDigest(bytes32 jobId, bytes32 resultDigest, bool passed, uint256 amount, address provider)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(RECEIPT_TYPEHASH, jobId, resultDigest, passed, amount, provider)));
    }

    /// @notice The EIP-712 domain separator (chain id and this contract's address included).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _open(
        bytes32 jobId,
        address payer,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline
    ) private {
        if (jobs[jobId].status != Status.None) revert JobExists(jobId);
        if (provider == address(0) || validator == address(0) || amount == 0 || deadline <= block.timestamp) {
            revert InvalidTerms();
        }
        jobs[jobId] = Job(payer, deadline, Status.Open, provider, validator, amount);
        emit Funded(jobId, payer, provider, validator, amount, deadline);
    }

    function _openJob(bytes32 jobId) private view returns (Job storage job) {
        job = jobs[jobId];
        if (job.status != Status.Open) revert JobNotOpen(jobId);
    }

    function _checkReceipt(
        Job storage job,
        bytes32 jobId,
        bytes32 resultDigest,
        bool passed,
        uint256 amount,
        bytes calldata signature
    ) private view {
        bytes32 digest = receiptDigest(jobId, resultDigest, passed, amount, job.provider);
        (address signer, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || signer != job.validator) revert InvalidReceipt(signer);
    }
}
